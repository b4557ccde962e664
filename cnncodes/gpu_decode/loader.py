"""`DeviceLoader`: a three-stage pipeline, so reading, decoding and the network overlap.

    reader thread   reads batch n+2 (a pool of threads) and scans each JPEG's header
    decoder thread  decodes batch n+1 in one batched call on the device, orients, makes the views
    caller          runs the network on batch n

Queues of one batch between the stages bound the memory held ahead. The decoder thread works
on its own CUDA stream and synchronises it before handing a batch over.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import Batch, BadImage
from ..runtime import drain, pump
from .decoder import BatchDecoder, DecodeMany, fatal_error
from .jpeg import JpegHeader, orient, scan



def read_file(path: Path) -> bytes | str:
    """The file's bytes, or why it cannot be read (worded as `data.load_rgb` words it)."""
    try:
        data = path.read_bytes()
    except PermissionError:
        return "permission denied; make the file readable"
    except OSError as e:
        return f"cannot read file ({e.strerror})"
    return data if data else "empty file (0 bytes)"


@dataclass
class DecodeStats:
    """Who decoded what: images the device decoded, and the reasons others went to the CPU path."""

    device: int = 0
    cpu: int = 0  # fallbacks the CPU path decoded (the others were unreadable there too)
    reasons: Counter = field(default_factory=Counter)  # fallback reason -> images

    @property
    def fallbacks(self) -> int:
        return sum(self.reasons.values())

    def add(self, other: DecodeStats) -> None:
        self.device += other.device
        self.cpu += other.cpu
        self.reasons.update(other.reasons)


@dataclass
class _Raw:
    """One batch as the reader hands it on: (index, bytes and header) or (index, unreadable reason)."""

    indices: list[int]
    files: list[tuple[int, bytes, JpegHeader]]
    failed: list[tuple[int, str]]


class DeviceLoader:
    """Batches of `Batch` (uint8 (B, V, 3, H, W) images on `device`) in file order.

    `load(data)` decodes a fallback's bytes (as read) on the CPU (`Preprocessing.load`);
    `transform(img, index)` makes the views of one decoded image (a tensor on `device`, or a PIL
    image from `load` for a fallback); a transform with a `many(images, indices)` method gets
    the device-decoded images of a batch at once (same-sized ones resized in one call).
    `decode_many` replaces torchvision's decoder (tests inject fakes); `read` the file reader.
    """

    def __init__(self, root: str | os.PathLike, paths: Sequence[str], load: Callable, transform: Callable,
                 batch_size: int, device: torch.device, threads: int, decode_many: DecodeMany | None = None,
                 read: Callable[[Path], bytes | str] = read_file):
        self.root, self.paths, self.load, self.transform = Path(root), list(paths), load, transform
        self.batch_size, self.device, self.threads = batch_size, device, max(1, threads)
        self.decoder = BatchDecoder(device, decode_many)
        self.read = read
        self.stats = DecodeStats()

    @property
    def fallbacks(self) -> int:
        """Images the batch decoder did not take (handed to the CPU path)."""
        return self.stats.fallbacks

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        stop = threading.Event()
        raw: queue.Queue = queue.Queue(1)
        ready: queue.Queue = queue.Queue(1)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="read") as pool:
            stages = [
                threading.Thread(target=pump, args=(self._read_batches(pool), raw, stop), name="device-read", daemon=True),
                threading.Thread(target=pump, args=(self._decode_batches(drain(raw, stop), pool), ready, stop),
                                 name="device-decode", daemon=True),
            ]
            for t in stages:
                t.start()
            try:
                for batch in drain(ready, stop):
                    if self.device.type == "cuda":  # made on the decoder's stream, used and freed on this one
                        batch.images.record_stream(torch.cuda.current_stream(self.device))
                    yield batch
            finally:
                stop.set()
                for t in stages:
                    t.join()

    def _read_batches(self, pool: ThreadPoolExecutor) -> Iterator[_Raw]:
        for start in range(0, len(self.paths), self.batch_size):
            indices = list(range(start, min(start + self.batch_size, len(self.paths))))
            datas = pool.map(lambda i: self.read(self.root / self.paths[i]), indices)
            batch = _Raw(indices, [], [])
            for i, d in zip(indices, datas):
                if isinstance(d, str):
                    batch.failed.append((i, d))
                else:
                    batch.files.append((i, d, scan(d)))
            yield batch

    def _decode_batches(self, batches: Iterable[_Raw], pool: ThreadPoolExecutor) -> Iterator[Batch]:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for raw in batches:
                batch = self.decode(raw, pool)
                if stream is not None:
                    stream.synchronize()  # the batch is complete before the caller sees it
                yield batch

    def decode(self, raw: _Raw, pool: ThreadPoolExecutor) -> Batch:
        """Decode and transform one read batch: the device takes what it can, the CPU path the rest."""
        fast = [(i, d, h) for i, d, h in raw.files if h.reason is None]
        out = self.decoder([d for _, d, _ in fast])
        decoded: dict[int, torch.Tensor] = {}
        slow: dict[int, str] = {i: h.reason for i, _, h in raw.files if h.reason is not None}
        for (i, _, h), img in zip(fast, out):
            if isinstance(img, str):
                slow[i] = img
            else:
                decoded[i] = orient(img, h.orientation)
        try:
            views = self._views(decoded)
        except Exception as e:  # out of memory resizing full-size photos: one line, like the decoder's
            fatal = fatal_error(e, len(decoded), self.device, "resizing the views of")
            if fatal is None:
                raise
            raise fatal from e
        failed = list(raw.failed)
        self.stats.device += len(decoded)
        self.stats.reasons.update(slow.values())
        data = {i: d for i, d, _ in raw.files}  # the bytes already read: the CPU path decodes them, no second read
        for i, img in zip(slow, pool.map(self._load_on_cpu, [data[i] for i in slow])):
            if isinstance(img, str):
                failed.append((i, img))
            else:
                self.stats.cpu += 1
                views[i] = self.transform(img, i).to(self.device, non_blocking=True)
        good = [i for i in raw.indices if i in views]
        images = torch.stack([views[i] for i in good]) if good else torch.empty(0, dtype=torch.uint8, device=self.device)
        return Batch(torch.tensor(good, dtype=torch.long), images, sorted(failed))

    def _views(self, decoded: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        indices = list(decoded)
        many = getattr(self.transform, "many", None)
        if many is not None:
            return dict(zip(indices, many([decoded[i] for i in indices], indices)))
        return {i: self.transform(decoded[i], i) for i in indices}

    def _load_on_cpu(self, data: bytes):
        try:
            return self.load(data)
        except BadImage as e:
            return str(e)
