"""`extract` from WebDataset shards: one input shard -> one output shard, then one small index.

Rank 0 plans (stats every input shard, reads each output shard's attributes; never opens an
input shard that is done), every rank takes whole input shards from a shared queue (largest
first; a rank that is free takes the next) and writes each as one atomic output shard, and
after one barrier rank 0 writes the index (`store.sharded.write_index`). A killed run loses
at most the shard each process was on; every output shard depends on its input shard alone,
batched from the shard's start, so the result is the same for any number of processes.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import torchvision
from tqdm.auto import tqdm

from .. import distributed
from .._version import __version__
from ..data import BadImage, quiet_pil
from ..errors import CnnCodesError, Interrupted
from ..runtime import FileLock, process_cores
from ..store import FORMAT, SplitRows
from ..store.sharded import STORE, ShardEntry, output_shard, read_output_shard, shards_folder, write_index, write_output_shard
from ..webdata import InputShard, LabelNames, ShardDamaged, ShardSource, output_stem, read_samples, sample_image, sample_label
from .runner import ViewMaker

JPEG_KEYS = ("jpg", "jpeg")


@dataclass
class ShardJob:
    """An input shard to extract, its output shard, and why it is (re)done."""

    split: str
    shard: InputShard
    out: Path
    why: str  # "new", "changed" (input size/mtime), "torn" (output unreadable), "another configuration"


@dataclass
class ShardPlan:
    jobs: list[ShardJob]
    outputs: dict[str, list[tuple[InputShard, Path]]]  # every input shard of each split and its output
    done: int = 0  # input shards skipped as done
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # names this run's work queue


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

    @staticmethod
    def merge(reports: list[ShardReport]) -> ShardReport:
        out = ShardReport(seconds=max((r.seconds for r in reports), default=0.0))  # the slowest rank sets the pace
        for r in reports:
            out.images, out.codes, out.shards, out.not_jpeg = (out.images + r.images, out.codes + r.codes,
                                                               out.shards + r.shards, out.not_jpeg + r.not_jpeg)
            out.redone.update(r.redone)
            out.failed += r.failed
            out.skipped += r.skipped
        return out


def plan_shards(source: ShardSource, folder: Path, config_json: str, identity: str, overwrite: bool,
                strict: bool = False) -> ShardPlan:
    """Which input shards to extract: every one without a valid output shard of this configuration
    (`strict`: a done shard that skipped samples is refused, as its first run would have been)."""
    plan = ShardPlan([], {})
    for split, shards in source.shards().items():
        plan.outputs[split] = []
        for shard in shards:
            out = output_shard(folder, split, output_stem(shard.path))
            plan.outputs[split].append((shard, out))
            entry = read_output_shard(out)
            why = _why_redo(entry, out, shard, config_json, identity, overwrite)
            if why is None and strict and entry.skipped:
                name, reason = entry.skipped[0]
                raise CnnCodesError(f"{shard.path}: {name}: {reason} (--strict: fix the shard, or drop --strict to skip it)")
            if why is None:
                plan.done += 1
            else:
                plan.jobs.append(ShardJob(split, shard, out, why))
    return plan


def _why_redo(entry: ShardEntry | None, out: Path, shard: InputShard, config_json: str, identity: str,
              overwrite: bool) -> str | None:
    if entry is None:
        return "torn" if out.exists() else "new"
    o = entry.origin
    if o.get("config") != config_json or o.get("input") != identity:
        if not overwrite:
            raise CnnCodesError(f"{out}: an output shard of another configuration (backbone, preprocessing, views "
                                f"or labels); write to another -o, or pass --overwrite to replace it")
        return "another configuration"
    if (o.get("source"), o.get("source_size"), o.get("source_mtime_ns")) != (shard.path, shard.size, shard.mtime_ns):
        return "changed"
    return None


def largest_first(jobs: list[ShardJob]) -> list[ShardJob]:
    """The order ranks take shards from the queue: the big ones first, so the last to finish are small."""
    return sorted(jobs, key=lambda j: -j.shard.size)


class ShardExtractor:
    """Runs the network over whole input shards, writing one output shard each."""

    def __init__(self, runner, options, cache, source: ShardSource, log=None):
        self.runner, self.options, self.cache, self.log = runner, options, cache, log
        self.label_key = source.label_key
        names = source.classes()
        self.classes = None if names is None else {c: i for i, c in enumerate(names)}
        self.identity = json.dumps(source.identity(), sort_keys=True)
        self.pool = ThreadPoolExecutor(max(1, process_cores()), thread_name_prefix="decode")

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
        return report

    def one(self, job: ShardJob, report: ShardReport) -> None:
        """Extract one input shard into its output shard (written only when the shard could be read)."""
        rows = _Rows(self.cache.views_for(job.split) + 1)
        samples = damage = 0
        batch: list[tuple[str, bytes, int]] = []
        try:
            for sample in read_samples(job.shard.path):
                samples += 1
                item = self._item(job, sample, rows)
                if item is not None:
                    batch.append(item)
                    report.not_jpeg += item[3] not in JPEG_KEYS
                if len(batch) == self.options.batch_size:
                    self._run_batch(job, batch, rows)
                    batch = []
        except ShardDamaged as e:
            damage = 1
            self._bad(job, job.shard.name, f"{e}; the samples before it are kept", rows)
        except OSError as e:
            reason = f"cannot read this shard ({e.strerror or e})"
            if self.options.strict:
                raise CnnCodesError(f"{job.shard.path}: {reason} (--strict: fix it or drop it from the pattern)") from None
            report.failed.append((job.shard.path, reason))
            if self.log:
                self.log(f"warning: {job.shard.path}: {reason}; the other shards go on, rerun to retry it")
            return
        if batch:
            self._run_batch(job, batch, rows)
        origin = {"source": job.shard.path, "source_size": job.shard.size, "source_mtime_ns": job.shard.mtime_ns,
                  "samples": samples, "damaged": damage, "config": self.cache.to_json(), "input": self.identity,
                  "split": job.split, "max_label": rows.max_label}
        write_output_shard(job.out, rows.as_split_rows(self.runner.dim), origin)
        report.images += rows.images
        report.codes += rows.images * rows.per_image
        report.skipped += rows.skipped
        if job.why != "new":
            report.redone[job.why] += 1

    def _item(self, job: ShardJob, sample, rows: _Rows):
        """(row path, image bytes, label, ext) of a usable sample; a bad one is recorded and None."""
        name = f"{job.shard.name}/{sample.key}"
        try:
            if sample.problem:
                raise ValueError(sample.problem)
            ext, data = sample_image(sample)
            return name, data, sample_label(sample, self.label_key, self.classes), ext
        except LabelNames as e:
            raise CnnCodesError(f"{job.shard.path}: sample {sample.key}: {e}") from None
        except ValueError as e:
            self._bad(job, name, str(e), rows)
            return None

    def _bad(self, job: ShardJob, name: str, reason: str, rows: _Rows) -> None:
        if self.options.strict:
            raise CnnCodesError(f"{job.shard.path}: {name}: {reason} (--strict: fix the shard, or drop --strict to skip it)")
        rows.skipped.append((name, reason))

    def _run_batch(self, job: ShardJob, batch: list, rows: _Rows) -> None:
        paths = [b[0] for b in batch]
        views = ViewMaker(self.runner.pre, paths, rows.per_image - 1, self.cache.seed)

        def decode(i: int):
            try:
                return views(self.runner.pre.load(batch[i][1]), i), None
            except BadImage as e:
                return None, str(e)

        with quiet_pil():
            decoded = list(self.pool.map(decode, range(len(batch))))
        good = [i for i, (t, _) in enumerate(decoded) if t is not None]
        for i, (_, reason) in enumerate(decoded):
            if reason is not None:
                self._bad(job, paths[i], reason, rows)
        if good:
            feats = self.runner.codes(torch.stack([decoded[i][0] for i in good]))
            rows.add([batch[i] for i in good], feats)


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

    def add(self, items: list, feats: np.ndarray) -> None:
        self.feats.append(feats)
        self.paths += [it[0] for it in items]
        self.labels += [it[2] for it in items]

    def as_split_rows(self, dim: int) -> SplitRows:
        v = self.per_image
        return SplitRows(
            features=np.concatenate(self.feats) if self.feats else np.zeros((0, dim), np.float32),
            labels=np.repeat(np.asarray(self.labels, np.int64), v),
            paths=[p for p in self.paths for _ in range(v)],
            views=np.tile(np.arange(v), len(self.paths)),
            skipped=self.skipped,
        )


def extract_shards(source: ShardSource, out: Path, options, cache, info, pre, dev, overwrite: bool, progress: bool,
                   request: str, log) -> dict:
    """The sharded `extract` on every rank: plan (rank 0), extract whole shards, index (rank 0).

    Returns what `api.extract` reports: report (ShardReport summed over ranks), plan counts,
    split_counts and skipped (rank 0), up_to_date."""
    from .runner import Runner

    main = distributed.is_main()
    folder = shards_folder(out)
    identity = json.dumps(source.identity(), sort_keys=True)
    with contextlib.ExitStack() as stack:
        error, plan = None, None
        if main:
            try:
                stack.enter_context(FileLock(out, what=f"cache {out}"))  # one writer per store
                _refuse_other_cache(out, overwrite)
                _remove_temporaries(folder)
                plan = plan_shards(source, folder, cache.to_json(), identity, overwrite, options.strict)
            except CnnCodesError as e:
                error = str(e)
        distributed.share_error(error, dev)
        plan = distributed.broadcast_object(plan)
        if main and log:
            why = Counter(j.why for j in plan.jobs)
            log(f"{sum(map(len, plan.outputs.values()))} input shards: {plan.done} done, {len(plan.jobs)} to extract"
                + (f" ({', '.join(f'{n} {w}' for w, n in why.items())})" if why else "")
                + f" by {distributed.world_size()} process(es)")
        report = ShardReport()
        if plan.jobs:
            runner = Runner(options, cache, info, pre, dev, log if main else None)
            queue = distributed.WorkQueue(f"shards/{plan.token}")  # the store outlives one call under torchrun
            report = ShardExtractor(runner, options, cache, source, log if main else None).run(
                largest_first(plan.jobs), queue, progress and main)
        report = ShardReport.merge(distributed.gather_objects(report))
        result = {"report": report, "done": plan.done, "up_to_date": False, "split_counts": {}, "skipped": []}
        if main:
            result.update(_write_index(out, plan, cache, source, request, report))
        distributed.barrier()  # other ranks return once the index is complete
    return result


def _write_index(out: Path, plan: ShardPlan, cache, source: ShardSource, request: str, report: ShardReport) -> dict:
    """Index every input shard with a valid output shard, in input order (failed ones are left out)."""
    failed = {p for p, _ in report.failed}
    entries: dict[str, list[ShardEntry]] = {}
    skipped: dict[str, list[tuple[str, str]]] = {}
    for split, pairs in plan.outputs.items():
        entries[split], skipped[split] = [], []
        for shard, path in pairs:
            entry = None if shard.path in failed else read_output_shard(path)
            if entry is not None:
                entries[split].append(entry)
                skipped[split] += entry.skipped
    every = [e for es in entries.values() for e in es]
    dim = max((e.feature_dim for e in every), default=0)
    names = source.classes() or [str(i) for i in range(max((e.max_label for e in every), default=-1) + 1)]
    versions = {"cnncodes": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}
    write_index(out, cache, names, dim, entries, skipped, versions, request, source.identity())
    return {"split_counts": {s: sum(e.rows for e in es) for s, es in entries.items()},
            "skipped": [s for ss in skipped.values() for s in ss],
            "up_to_date": not plan.jobs}


def _refuse_other_cache(out: Path, overwrite: bool) -> None:
    """Only an index is rewritten (its shards decide what is done): an ordinary cache or any other
    file at `out` is finished work of another kind, replaced only with --overwrite."""
    if overwrite or not out.exists():
        return
    try:
        with h5py.File(out, "r") as f:
            fmt, store = f.attrs.get("format"), f.attrs.get("store")
    except OSError:
        fmt = store = None
    if fmt == FORMAT and store == STORE:
        return
    what = "a cache extracted from a folder or CSV" if fmt == FORMAT else "not a cnncodes index"
    raise CnnCodesError(f"{out} is {what}; write the shards' codes to another -o, or pass --overwrite to replace it")


def _remove_temporaries(folder: Path) -> None:
    """Temporary files of output shards a killed run was writing (never finished work)."""
    if folder.is_dir():
        for tmp in folder.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)
