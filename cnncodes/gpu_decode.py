"""Decode on the device: threads read file bytes, JPEGs are decoded in batches by nvJPEG
(`torchvision.io.decode_jpeg(..., device='cuda')`) and resized, cropped and augmented there.

On a GPU the CPU decoders are the bottleneck (1,300 img/s with 15 workers against a
12,000 img/s resnet50 bf16 forward on an H100); nvJPEG plus GPU resizing did 6,700 img/s.
The device is a parameter: on 'cpu' the same pipeline runs libjpeg-turbo through the same
torchvision call, which is how the tests compare it with the PIL path (`data.ImageFiles`).

Same preprocessing as the CPU path: the transform (`extract.runner.ViewMaker`: `Preprocessing`
eval view and seeded random views) is applied to the decoded tensor wherever it lives.
Images the batch decoder should not take (not a JPEG, CMYK/YCCK, no end marker, or any
the decoder refuses) are decoded by the CPU path one by one (`fallbacks` counts them);
a file that path cannot read either is reported in `Batch.failed`, never raised.
Known difference: PIL decodes large JPEGs at a reduced DCT scale (`Preprocessing.draft_size`),
the device path at full size; for photos whose sides exceed twice the resize target the
two resized results can differ by more than one grey level.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .data import Batch, BadImage
from .errors import CnnCodesError
from .extract.config import DECODES

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers


def resolve_decode(decode: str, device: torch.device) -> str:
    """'auto' decodes on the GPU when the network runs on one; 'gpu' without CUDA is an error."""
    if decode not in DECODES:
        raise CnnCodesError(f"unknown --decode '{decode}'; use one of {', '.join(DECODES)}")
    if decode == "gpu" and device.type != "cuda":
        raise CnnCodesError("--decode gpu needs the network on a CUDA device (--device cuda); use --decode cpu")
    if decode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return decode


def batch_decodable(data: bytes) -> bool:
    """True for a complete 1- or 3-channel JPEG (what nvJPEG takes): SOI, a frame header
    with 1 or 3 components, and the EOI marker at the end (a truncated file goes to PIL,
    which refuses it, rather than to a decoder that may grey-fill it)."""
    if len(data) < 4 or data[:3] != b"\xff\xd8\xff" or data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return False
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            return data[i + 9] in (1, 3)
        i += 2 + length
    return False


def decode_batch(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 (3, H, W) tensors on `device`, EXIF orientation applied; None where the
    decoder refused an image (one bad image fails a whole batch call, so retry one by one)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    kw = {"device": device, "mode": ImageReadMode.RGB, "apply_exif_orientation": True}
    try:
        return list(decode_jpeg(tensors, **kw)) if tensors else []
    except RuntimeError:
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, **kw))
            except RuntimeError:
                out.append(None)
        return out


def _read(path: Path) -> bytes | str:
    """The file's bytes, or the reason it cannot be read (as `data.load_rgb` words it)."""
    try:
        data = path.read_bytes()
    except PermissionError:
        return "permission denied; make the file readable"
    except OSError as e:
        return f"cannot read file ({e.strerror})"
    return data if data else "empty file (0 bytes)"


class DeviceLoader:
    """Batches of `Batch` (uint8 (B, V, 3, H, W) images on `device`) in file order.

    `transform(img, index)` makes the views of one decoded image (a tensor on `device`, or
    a PIL image from `load` for the fallback). A background thread prepares `prefetch`
    batches ahead on its own CUDA stream, so decoding overlaps the network.
    """

    def __init__(self, root: str | os.PathLike, paths: Sequence[str], load: Callable, transform: Callable,
                 batch_size: int, device: torch.device, threads: int, prefetch: int = 2):
        self.root, self.paths, self.load, self.transform = Path(root), list(paths), load, transform
        self.batch_size, self.device, self.threads, self.prefetch = batch_size, device, max(1, threads), prefetch
        self.fallbacks = 0  # images the batch decoder did not take, decoded by the CPU path

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(q, stop), name="device-decode", daemon=True)
        worker.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if self.device.type == "cuda":  # made on the side stream, used and freed on this one
                    item.images.record_stream(torch.cuda.current_stream(self.device))
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass

    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="read") as pool, \
                    (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
                for start in range(0, len(self.paths), self.batch_size):
                    if stop.is_set():
                        return
                    batch = self.batch(range(start, min(start + self.batch_size, len(self.paths))), pool)
                    if stream is not None:
                        stream.synchronize()  # the batch is complete before the consumer sees it
                    q.put(batch)
            q.put(None)
        except BaseException as e:  # handed to the consumer, which raises it
            q.put(e)

    def batch(self, indices: Sequence[int], pool: ThreadPoolExecutor) -> Batch:
        """Read, decode and transform the files at `indices` (positions in `paths`)."""
        raw = list(pool.map(lambda i: _read(self.root / self.paths[i]), indices))
        failed = [(i, r) for i, r in zip(indices, raw) if isinstance(r, str)]
        fast = [(i, r) for i, r in zip(indices, raw) if isinstance(r, bytes) and batch_decodable(r)]
        decoded = dict(zip([i for i, _ in fast], decode_batch([r for _, r in fast], self.device)))
        slow = [i for i, r in zip(indices, raw) if isinstance(r, bytes) and decoded.get(i) is None]
        self.fallbacks += len(slow)
        for i, img in zip(slow, pool.map(self._load_on_cpu, slow)):
            if isinstance(img, str):
                failed.append((i, img))
            else:
                decoded[i] = img
        good = [i for i in indices if decoded.get(i) is not None]
        views = [self.transform(decoded[i], i).to(self.device, non_blocking=True) for i in good]
        images = torch.stack(views) if views else torch.empty(0, dtype=torch.uint8, device=self.device)
        return Batch(torch.tensor(good, dtype=torch.long), images, sorted(failed))

    def _load_on_cpu(self, i: int):
        try:
            return self.load(self.root / self.paths[i])
        except BadImage as e:
            return str(e)

