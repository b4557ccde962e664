"""One rank's side of `extract`: whole input shards taken from the shared queue, each read in
order (`ShardSource.items`), decoded (a CPU thread pool, or nvJPEG batches for files), run through
the network and written as one atomic output shard (see `extract.sharded` for the plan and index)."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..data import BadImage, quiet_pil
from ..errors import CnnCodesError, Interrupted
from ..folders import JPEG_SUFFIXES
from ..gpu_decode import DecodeStats
from ..runtime import prefetch, process_cores
from ..store import SplitRows
from ..store.sharded import ShardEntry, write_output_shard
from ..sources import InputShard, Item, ShardDamaged, ShardSource
from .runner import ViewMaker

@dataclass
class ShardJob:
    """An input shard to extract, its output shard, and why it is (re)done."""

    split: str
    shard: InputShard
    out: Path
    why: str  # "new", "changed" (input size/mtime), "torn" (output unreadable), "another configuration"


@dataclass
class ShardReport:
    """What one process did (summed over processes by `merge`)."""

    images: int = 0
    codes: int = 0
    seconds: float = 0.0
    shards: int = 0
    redone: Counter = field(default_factory=Counter)  # why -> input shards redone
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input shard, reason): no output written
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (shard/key, reason) of bad samples
    not_jpeg: int = 0
    not_jpeg_example: str = ""  # one of them, for the note
    entries: list[ShardEntry] = field(default_factory=list)  # the output shards written, for the index
    decode_stats: DecodeStats = field(default_factory=DecodeStats)  # who decoded the images, why any fell back

    @staticmethod
    def merge(reports: list[ShardReport]) -> ShardReport:
        out = ShardReport(seconds=max((r.seconds for r in reports), default=0.0))  # the slowest rank sets the pace
        for r in reports:
            out.images, out.codes, out.shards, out.not_jpeg = (out.images + r.images, out.codes + r.codes,
                                                               out.shards + r.shards, out.not_jpeg + r.not_jpeg)
            out.redone.update(r.redone)
            out.failed += r.failed
            out.skipped += r.skipped
            out.entries += r.entries
            out.decode_stats.add(r.decode_stats)
            out.not_jpeg_example = out.not_jpeg_example or r.not_jpeg_example
        return out


class ShardExtractor:
    """Runs the network over whole input shards, writing one output shard each."""

    def __init__(self, runner, options, cache, source: ShardSource, log=None):
        self.runner, self.options, self.cache, self.source, self.log = runner, options, cache, source, log
        self.identity = json.dumps(source.identity(), sort_keys=True)
        self.pool = ThreadPoolExecutor(max(1, options.workers or process_cores()), thread_name_prefix="decode")
        # On a GPU, reading and decoding the next batches overlaps the network; on a CPU they would
        # fight over the same cores (see data.default_workers), so they take turns.
        self.prefetch = runner.dev.type == "cuda"

    def run(self, jobs: list[ShardJob], queue: distributed.WorkQueue, progress: bool) -> ShardReport:
        """Take shards of `jobs` from `queue` until none is left. The bar (rank 0) counts the shards
        every rank has taken, so its total and ETA are the whole run's; img/s are this rank's."""
        report = ShardReport()
        world = distributed.world_size()
        bar = tqdm(total=len(jobs), unit="shard", desc="extract", disable=not progress, dynamic_ncols=True)
        start = time.perf_counter()
        try:
            while (i := queue.take()) < len(jobs):
                bar.update(max(0, i - bar.n))  # shards the other ranks took meanwhile
                self.one(jobs[i], report)
                report.shards += 1
                seconds = time.perf_counter() - start
                rate = report.images / max(seconds, 1e-9)
                bar.set_postfix_str(f"{rate:.1f} img/s" + (f" on rank 0 (~{world * rate:.0f} in all)" if world > 1 else ""),
                                    refresh=False)
                bar.update(1)
            bar.update(len(jobs) - bar.n)
        except KeyboardInterrupt:
            raise Interrupted("stopped; finished shards are kept; rerun the same command to continue") from None
        finally:
            bar.close()
            self.pool.shutdown()
        report.seconds = time.perf_counter() - start
        report.decode_stats = self.runner.decode_stats
        return report

    def one(self, job: ShardJob, report: ShardReport) -> None:
        """Extract one input shard into its output shard (written only when the shard could be read)."""
        rows = _Rows(self.cache.views_for(job.split) + 1)
        read = {"samples": 0, "damaged": 0, "not_jpeg": 0}
        on_device = self.options.decode == "gpu"
        batches = self._device_decoded(job, rows, read) if on_device else self._decoded(job, rows, read)
        try:
            # PIL's warning filter is process-wide and only the main thread may set it: here, around
            # the reader thread's decoding (inline, `_decode` sets it around each batch itself).
            with quiet_pil() if self.prefetch and not on_device else contextlib.nullcontext():
                for items, images in prefetch(batches, 2) if self.prefetch and not on_device else batches:
                    rows.add(items, self.runner.codes(images))
        except OSError as e:
            reason = f"cannot read this shard ({e.strerror or e})"
            if self.options.strict:
                raise CnnCodesError(f"{job.shard.path}: {reason} (--strict: fix it or drop it from the pattern)") from None
            report.failed.append((job.shard.path, reason))
            if self.log:
                self.log(f"warning: {job.shard.path}: {reason}; the other shards go on, rerun to retry it")
            return
        origin = {**job.shard.signature(), "samples": read["samples"], "damaged": read["damaged"],
                  "config": self.cache.to_json(), "input": self.identity, "split": job.split, "max_label": rows.max_label}
        files = [(f.path, f.size, f.mtime_ns) for f in job.shard.members]  # a folder shard's files, as signed
        write_output_shard(job.out, rows.as_split_rows(self.runner.dim, files), origin)
        report.entries.append(ShardEntry(job.out, rows.images * rows.per_image, self.runner.dim, rows.max_label,
                                         {k: v for k, v in origin.items() if k != "config"}, rows.skipped))
        report.images += rows.images
        report.codes += rows.images * rows.per_image
        report.skipped += rows.skipped
        report.not_jpeg += read["not_jpeg"]
        report.not_jpeg_example = report.not_jpeg_example or read.get("example", "")
        if job.why != "new":
            report.redone[job.why] += 1

    def _decoded(self, job: ShardJob, rows: _Rows, read: dict) -> Iterator[tuple[list[Item], torch.Tensor]]:
        """The shard's usable items, decoded, in batches of batch_size (counted from the shard's
        start: the same batches whichever rank runs it). A damaged shard ends there, recorded."""
        batch: list[Item] = []
        try:
            for item in self.source.items(job.shard):
                read["samples"] += 1
                if item.problem:
                    self._bad(job, item.key, item.problem, rows, item.path)
                    continue
                batch.append(item)
                _count_format(item, read)
                if len(batch) == self.options.batch_size:
                    yield from self._decode(job, batch, rows)
                    batch = []
        except ShardDamaged as e:
            read["damaged"] = 1
            self._bad(job, Path(job.shard.path).name, f"{e}; the samples before it are kept", rows)
        if batch:
            yield from self._decode(job, batch, rows)

    def _device_decoded(self, job: ShardJob, rows: _Rows, read: dict) -> Iterator[tuple[list[Item], torch.Tensor]]:
        """A folder shard's files read and decoded in nvJPEG batches on the device (`DeviceLoader`),
        the files it cannot take decoded on the CPU path; the same batches as `_decoded`."""
        from ..gpu_decode import DeviceLoader  # noqa: PLC0415  (imports torchvision.io's decoder)

        items = []
        for item in self.source.items(job.shard):
            read["samples"] += 1
            if item.path is None:
                raise CnnCodesError(f"{job.shard.path}: --decode gpu reads image files; this input carries its images "
                                    f"inside the shard: use --decode cpu")
            if item.problem:
                self._bad(job, item.key, item.problem, rows, item.path)
            else:
                items.append(item)
                _count_format(item, read)
        views = ViewMaker(self.runner.pre, [it.key for it in items], rows.per_image - 1, self.cache.seed)
        loader = DeviceLoader("/", [it.path for it in items], self.runner.pre.load, views, self.options.batch_size,
                              self.runner.dev, self.options.workers or process_cores(),
                              decode_many=self.runner.decode_many)
        for batch in loader:
            for i, reason in batch.failed:
                self._bad(job, items[i].key, reason, rows, items[i].path)
            if len(batch.indices):
                yield [items[i] for i in batch.indices.tolist()], batch.images
        self.runner.decode_stats.add(loader.stats)

    def _bad(self, job: ShardJob, name: str, reason: str, rows: _Rows, file: str | None = None) -> None:
        """Record a skipped sample (`file`: the image file it was read from); with --strict, stop."""
        if self.options.strict:
            if file is not None:
                raise CnnCodesError(f"{file}: {reason} (--strict: fix or remove the file, or drop --strict to skip it)")
            raise CnnCodesError(f"{job.shard.path}: {name}: {reason} (--strict: fix the shard, or drop --strict to skip it)")
        rows.skipped.append((name, reason))

    def _decode(self, job: ShardJob, batch: list[Item], rows: _Rows) -> Iterator[tuple[list[Item], torch.Tensor]]:
        """Decode a batch on the thread pool (bytes in the shard, or a file read there); bad images recorded."""
        keys = [it.key for it in batch]
        views = ViewMaker(self.runner.pre, keys, rows.per_image - 1, self.cache.seed)

        def decode(i: int):
            item = batch[i]
            try:
                return views(self.runner.pre.load(item.data if item.data is not None else item.path), i), None
            except BadImage as e:
                return None, str(e)

        with quiet_pil():
            decoded = list(self.pool.map(decode, range(len(batch))))
        for i, (_, reason) in enumerate(decoded):
            if reason is not None:
                self._bad(job, keys[i], reason, rows, batch[i].path)
        good = [i for i, (t, _) in enumerate(decoded) if t is not None]
        self.runner.decode_stats.cpu += len(good)
        if good:
            yield [batch[i] for i in good], torch.stack([decoded[i][0] for i in good])

    def run_batch(self, job: ShardJob, batch: list[Item], rows: _Rows) -> None:
        """Decode and run one batch, inline (bench/wds_scale.py times exactly this, in memory)."""
        for items, images in self._decode(job, batch, rows):
            rows.add(items, self.runner.codes(images))


def _count_format(item: Item, read: dict) -> None:
    """Count the items the JPEG draft decode cannot speed up (by extension), keeping one example."""
    if f".{item.ext}" not in JPEG_SUFFIXES:
        read["not_jpeg"] += 1
        read.setdefault("example", item.key)


class _Rows:
    """The rows of one output shard, gathered in memory until the shard is finished."""

    def __init__(self, per_image: int):
        self.per_image = per_image
        self.feats: list[np.ndarray] = []
        self.paths: list[str] = []
        self.labels: list[int] = []
        self.skipped: list[tuple[str, str]] = []

    @property
    def images(self) -> int:
        return len(self.labels)

    @property
    def max_label(self) -> int:
        return max(self.labels, default=-1)

    def add(self, items: list[Item], feats: np.ndarray) -> None:
        self.feats.append(feats)
        self.paths += [it.key for it in items]
        self.labels += [it.label for it in items]

    def as_split_rows(self, dim: int, files: list[tuple[str, int, int]]) -> SplitRows:
        v = self.per_image
        return SplitRows(
            features=np.concatenate(self.feats) if self.feats else np.zeros((0, dim), np.float32),
            labels=np.repeat(np.asarray(self.labels, np.int64), v),
            paths=[p for p in self.paths for _ in range(v)],
            views=np.tile(np.arange(v), len(self.paths)),
            files=files,
            skipped=self.skipped,
        )


