"""`extract`: one pass of a headless backbone over an image folder, cached to HDF5.

images -> `data.ImageFiles` -> headless backbone -> shards in `<cache>.parts/` -> one cache.
Shards are flushed at batch boundaries every `checkpoint_every` seconds, so a killed
run loses at most that much work and a rerun recomputes exactly the same batches.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from tqdm.auto import tqdm

from . import __version__, distributed
from .backbones import create_extractor, parse_layers, resolve_preprocessing, resolve_weights
from .data import (
    FolderLayout,
    ImageFile,
    ImageFiles,
    Normalize,
    Preprocessing,
    as_tensor,
    discover,
    make_loader,
    view_seed,
)
from .errors import CnnCodesError, Interrupted
from .runtime import (
    FileLock,
    atomic_path,
    autocast,
    check_precision,
    check_space,
    configure_threads,
    inference_batch_size,
    resolve_device,
)
from .store import (
    Cache,
    CacheConfig,
    RowSource,
    SplitPlan,
    SplitRows,
    read_shard,
    read_table,
    write_cache,
    write_shard,
)


@dataclass
class ExtractResult:
    """What one `extract` call did."""

    cache: Path
    extracted: int = 0  # images run through the network in this call
    codes: int = 0  # rows written by this call (images x views)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # all skipped files in the cache
    seconds: float = 0.0  # wall time of the network pass
    up_to_date: bool = False
    split_counts: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0


class ViewMaker:
    """Decoded image -> (1 + K, 3, H, W) uint8: the eval view, then K seeded augmented views."""

    def __init__(self, pre: Preprocessing, paths: list[str], views: int, seed: int):
        self.pre, self.paths, self.views, self.seed = pre, paths, views, seed

    def __call__(self, img: Image.Image, index: int) -> torch.Tensor:
        img = as_tensor(img)
        out = [self.pre.eval_view(img)]
        for k in range(1, self.views + 1):
            g = torch.Generator().manual_seed(view_seed(self.seed, self.paths[index], k))
            out.append(self.pre.random_view(img, g))
        return torch.stack(out)


def extract(
    data: str | Path,
    out: str | Path,
    *,
    arch: str = "resnet18",
    weights: str = "DEFAULT",
    image_size: int | None = None,
    layers: str | None = None,
    preprocess_like: str | None = None,
    views: int = 0,
    eval_views: int = 0,
    seed: int = 0,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    channels_last: bool = True,
    strict: bool = False,
    overwrite: bool = False,
    checkpoint_every: float = 30.0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ExtractResult:
    """Extract CNN codes for every image under `data` into the HDF5 cache `out`.

    Resumable (rerun the same call after a crash), incremental (only new or changed
    files are extracted), and refuses to mix configurations unless `overwrite`.
    `batch_size` None = `inference_batch_size(device)` (16 on CPU, 128 on CUDA).
    `layers` ("NAME[,NAME...]"): pooled codes of those intermediate layers, concatenated,
    instead of the classifier's input (`cnncodes archs ARCH --layers` lists the names).
    `preprocess_like`: the weights name whose preprocessing a weights file follows (default DEFAULT's).
    """
    if views < 0 or eval_views < 0 or (batch_size is not None and batch_size < 1):
        raise CnnCodesError("--views/--eval-views must be >= 0 and --batch-size >= 1")
    layout = discover(data)
    for w in layout.warnings:
        log(f"warning: {w}")
    dev = resolve_device(device)
    batch_size = batch_size or inference_batch_size(dev)
    check_precision(precision, dev)
    info = resolve_weights(arch, weights)
    pre = resolve_preprocessing(arch, info, image_size, preprocess_like)
    layers = parse_layers(arch, layers)
    config = CacheConfig(arch, info.identity, info.name, precision, pre.to_dict(), views, eval_views, seed, layers)
    if strict:
        _fail_on_ignored(layout)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = out.with_name(out.name + ".parts")
    dev = distributed.init(dev)
    try:
        return _extract_locked(layout, out, parts, config, info, pre, dev, overwrite, batch_size, workers, precision,
                               channels_last, strict, checkpoint_every, progress, log)
    finally:
        distributed.cleanup()


def _extract_locked(layout, out, parts, config, info, pre, dev, overwrite, batch_size, workers, precision, channels_last,
                    strict, checkpoint_every, progress, log=print) -> ExtractResult:
    """The body of `extract`: under torchrun every rank runs it, rank 0 alone locks and merges."""
    main = distributed.is_main()
    with contextlib.ExitStack() as stack:
        error = None
        if main:  # one writer per cache: a second run is refused before any work
            try:
                stack.enter_context(FileLock(out, what=f"cache {out}"))
                checked = _open_existing(out, config, overwrite)  # refuses a mismatched config early
                if checked is not None:
                    checked.close()
                _prepare_parts(parts, config, overwrite)
            except CnnCodesError as e:
                error = str(e)
        distributed.share_error(error, dev)
        old = _open_existing(out, config, overwrite)
        stack.callback(lambda: old is not None and old.close())
        done = _Done.collect(old, parts, layout)
        todo = {s: [f for f in files if not done.has(s, f)] for s, files in layout.splits.items()}
        done.close()
        result = ExtractResult(out)
        if any(todo.values()):
            mine = {s: _deal(files, batch_size) for s, files in todo.items()}
            runner = _Runner(config, info, pre, dev, precision, channels_last, batch_size, workers, strict,
                             log if main else None)
            result.extracted, result.codes, result.seconds = runner.run(layout, mine, parts, checkpoint_every,
                                                                        progress and main)
            result.extracted, result.codes, result.seconds = _sum_over_ranks(result, dev)
        if main:
            done = _Done.collect(old, parts, layout)
            plans = done.plans(layout)
            if old is not None and not any(todo.values()) and done.unchanged(old, plans, layout):
                result.up_to_date = True
            else:
                dim = done.feature_dim or (old.feature_dim if old is not None else 0)
                versions = {"cnncodes": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}
                check_space(out, _cache_bytes(plans, dim), f"; finished work is kept in {parts}")
                write_cache(out, config, layout.classes, dim, plans, versions)
            done.close()
            shutil.rmtree(parts, ignore_errors=True)
            result.skipped = [(p, r) for plan in plans.values() for p, r in plan.skipped]
            result.split_counts = {s: int(plan.rows) for s, plan in plans.items()}
        distributed.barrier()  # other ranks return only once the cache is complete
    return result


def _cache_bytes(plans: dict[str, SplitPlan], dim: int) -> int:
    """A generous estimate of the cache's size: codes plus per-row and per-file records."""
    rows = sum(p.rows for p in plans.values())
    files = sum(len(p.files) + len(p.skipped) for p in plans.values())
    return int(1.1 * rows * (4 * dim + 160) + 300 * files + (1 << 20))


def _deal(files: list[ImageFile], batch_size: int) -> list[ImageFile]:
    """This rank's share: whole batches dealt round-robin, so every batch is the one a single
    process would run (identical codes whatever the number of processes)."""
    world, rank = distributed.world_size(), distributed.rank()
    if world == 1:
        return files
    blocks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    return [f for block in blocks[rank::world] for f in block]


def _sum_over_ranks(r: ExtractResult, dev: torch.device) -> tuple[int, int, float]:
    if distributed.world_size() == 1:
        return r.extracted, r.codes, r.seconds
    t = distributed.all_reduce_sum(torch.tensor([r.extracted, r.codes], dtype=torch.float64,
                                                device=distributed.comm_device(dev)))
    secs = torch.tensor([r.seconds], dtype=torch.float64, device=distributed.comm_device(dev))
    torch.distributed.all_reduce(secs, op=torch.distributed.ReduceOp.MAX)  # the slowest rank sets the pace
    return int(t[0].item()), int(t[1].item()), float(secs.item())


def _fail_on_ignored(layout: FolderLayout) -> None:
    for split, entries in layout.ignored.items():
        if entries:
            path, reason = entries[0]
            raise CnnCodesError(f"{layout.root / path}: {reason} (--strict: remove or fix the file, or drop --strict to skip it)")


def _open_existing(out: Path, config: CacheConfig, overwrite: bool) -> Cache | None:
    if overwrite or not out.exists():
        return None
    try:
        old = Cache(out)
    except CnnCodesError as e:
        raise CnnCodesError(f"{e}; or pass --overwrite to replace {out}") from None
    diffs = config.differences(old.config)
    if diffs:
        old.close()
        raise CnnCodesError(
            f"{out} was extracted with another configuration ({'; '.join(diffs)}); "
            f"write to another -o, or pass --overwrite to replace it"
        )
    return old


def _prepare_parts(parts: Path, config: CacheConfig, overwrite: bool) -> None:
    """The parts folder holds shards of one configuration; a stale one is refused or cleared."""
    stamp = parts / "config.json"
    no_work = not any(parts.glob("*.h5"))  # e.g. a run that failed before its first batch
    if parts.exists() and (overwrite or no_work or not stamp.exists()):
        shutil.rmtree(parts)
    if parts.exists():
        try:
            theirs = CacheConfig.from_json(stamp.read_text())
        except (ValueError, TypeError, OSError):
            theirs = None
        if theirs != config:
            raise CnnCodesError(
                f"{parts} holds unfinished work of another configuration; rerun that command to finish it, "
                f"or pass --overwrite to discard it"
            )
        return
    parts.mkdir(parents=True)
    with atomic_path(stamp) as tmp:
        tmp.write_text(config.to_json())


class _Done:
    """What is already extracted, from the old cache and from shards, keyed by (split, path)."""

    def __init__(self):
        self.rows: dict[tuple[str, str], RowSource] = {}
        self.sigs: dict[tuple[str, str], tuple[int, int]] = {}
        self.skipped: dict[tuple[str, str], str] = {}
        self.shards: list = []
        self.feature_dim = 0

    @classmethod
    def collect(cls, old: Cache | None, parts: Path, layout: FolderLayout) -> _Done:
        done = cls()
        if old is not None:
            for split in old.splits:
                done._add(split, old.file[split])
        for path in sorted(parts.glob("*.h5")):
            shard = read_shard(path)
            if shard is None:
                path.unlink(missing_ok=True)  # a torn shard: its images are simply redone
                continue
            done.shards.append(shard)
            done._add(path.name.split("-r")[0], shard)
        return done

    def _add(self, split: str, g) -> None:
        if g["features"].shape[0]:
            self.feature_dim = int(g["features"].shape[1])
        paths = g["paths"].asstr()[()]
        start = 0
        for i in range(1, len(paths) + 1):  # rows of one image are contiguous
            if i == len(paths) or paths[i] != paths[start]:
                self.rows[(split, paths[start])] = RowSource(g, start, i)
                start = i
        for p, size, mtime in read_table(g, "files"):
            self.sigs[(split, p)] = (size, mtime)
        for p, reason in read_table(g, "skipped"):
            self.skipped[(split, p)] = reason

    def has(self, split: str, f: ImageFile) -> bool:
        return self.sigs.get((split, f.path)) == (f.size, f.mtime_ns)

    def plans(self, layout: FolderLayout) -> dict[str, SplitPlan]:
        plans = {}
        for split, files in layout.splits.items():
            runs, labels, records, skipped = [], [], [], []
            for f in files:
                key = (split, f.path)
                if not self.has(split, f):
                    continue
                records.append((f.path, f.size, f.mtime_ns))
                if key in self.rows:
                    run = self.rows[key]
                    runs.append(run)
                    labels.append(np.full(run.stop - run.start, f.label))
                else:
                    skipped.append((f.path, self.skipped.get(key, "skipped")))
            skipped += layout.ignored.get(split, [])
            label_arr = np.concatenate(labels) if labels else np.zeros(0, np.int64)
            plans[split] = SplitPlan(runs, label_arr, records, skipped)
        return plans

    def unchanged(self, old: Cache, plans: dict[str, SplitPlan], layout: FolderLayout) -> bool:
        """True when writing `plans` would reproduce `old` exactly (nothing to do)."""
        if sorted(old.splits) != sorted(plans) or old.classes != layout.classes:
            return False
        for split, plan in plans.items():
            g = old.file[split]
            if plan.rows != g["features"].shape[0] or any(r.group != g for r in plan.runs):
                return False
            if [r.start for r in plan.runs] != sorted(r.start for r in plan.runs):
                return False
            if not np.array_equal(plan.labels, g["labels"][()]) or plan.skipped != old.skipped(split):
                return False
        return True

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


class _Runner:
    """Runs the headless backbone over the files still to do, writing shards as it goes."""

    def __init__(self, config, info, pre, dev, precision, channels_last, batch_size, workers, strict, log=None):
        configure_threads(dev)
        self.model, _, self.dim = create_extractor(config.arch, info, layers=config.layers, log=log)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model = self.model.to(dev)
        self.normalize = Normalize(pre.mean, pre.std, channels_last).to(dev)
        self.pre, self.config, self.dev, self.precision = pre, config, dev, precision
        self.batch_size = batch_size
        self.workers = workers  # None: make_loader sizes them
        self.strict = strict

    @torch.inference_mode()
    def codes(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (B, V, 3, H, W) -> float32 (B * V, D) codes, in forward passes of <= batch_size rows."""
        x = images.flatten(0, 1).to(self.dev, non_blocking=True)
        with autocast(self.dev, self.precision):
            return torch.cat([self.model(self.normalize(rows)).float() for rows in x.split(self.batch_size)]).cpu().numpy()

    def run(self, layout: FolderLayout, todo: dict[str, list[ImageFile]], parts: Path, every: float, progress: bool):
        total = sum(len(v) for v in todo.values())
        bar = tqdm(total=total, unit="img", desc="extract", disable=not progress, dynamic_ncols=True)
        images = codes = 0
        start = time.perf_counter()
        try:
            for split, files in todo.items():
                if files:
                    n_img, n_codes = self._run_split(layout, split, files, parts, every, bar)
                    images += n_img
                    codes += n_codes
        finally:
            bar.close()
        return images, codes, time.perf_counter() - start

    def _run_split(self, layout, split, files, parts, every, bar) -> tuple[int, int]:
        paths = [f.path for f in files]
        k = self.config.views_for(split)
        dataset = ImageFiles(layout.root, paths, self.pre.load, ViewMaker(self.pre, paths, k, self.config.seed))
        loader = make_loader(dataset, self.batch_size, self.workers, self.dev)
        shard = _ShardWriter(parts, split, k + 1, distributed.rank())
        images = codes = 0
        try:
            for batch in loader:
                for i, reason in batch.failed:
                    if self.strict:
                        raise CnnCodesError(f"{layout.root / files[i].path}: {reason} (--strict: fix or remove the file, or drop --strict to skip it)")
                    shard.skip(files[i], reason)
                if len(batch.indices):
                    feats = self.codes(batch.images)
                    shard.add([files[i] for i in batch.indices.tolist()], feats)
                    images += len(batch.indices)
                    codes += len(feats)
                bar.update(len(batch.indices) + len(batch.failed))
                if shard.age() > every:
                    shard.flush()
        except KeyboardInterrupt:
            shard.flush()
            raise Interrupted(f"stopped; finished batches are saved in {parts}; rerun the same command to continue") from None
        shard.flush()
        return images, codes


class _ShardWriter:
    """Buffers finished batches and writes them as one atomic shard file per flush."""

    def __init__(self, parts: Path, split: str, rows_per_image: int, rank: int = 0):
        self.parts, self.split, self.rows_per_image, self.rank = parts, split, rows_per_image, rank
        existing = [int(p.stem.rsplit("-", 1)[1]) for p in parts.glob(f"{split}-r{rank:03d}-*.h5")]
        self.seq = max(existing, default=0)
        self._reset()

    def _reset(self) -> None:
        self.feats: list[np.ndarray] = []
        self.files: list[ImageFile] = []
        self.skipped: list[tuple[ImageFile, str]] = []
        self.started = time.monotonic()

    def age(self) -> float:
        return time.monotonic() - self.started

    def add(self, files: list[ImageFile], feats: np.ndarray) -> None:
        self.files.extend(files)
        self.feats.append(feats)

    def skip(self, f: ImageFile, reason: str) -> None:
        self.skipped.append((f, reason))

    def flush(self) -> None:
        if not self.files and not self.skipped:
            return
        v = self.rows_per_image
        dim = self.feats[0].shape[1] if self.feats else 0
        records = [(f.path, f.size, f.mtime_ns) for f in self.files + [f for f, _ in self.skipped]]
        rows = SplitRows(
            features=np.concatenate(self.feats) if self.feats else np.zeros((0, dim), np.float32),
            labels=np.repeat([f.label for f in self.files], v).astype(np.int64),
            paths=[f.path for f in self.files for _ in range(v)],
            views=np.tile(np.arange(v), len(self.files)),
            files=records,
            skipped=[(f.path, reason) for f, reason in self.skipped],
        )
        self._reset()  # before writing: a Ctrl-C inside the write must not flush these rows twice
        self.seq += 1
        write_shard(self.parts / f"{self.split}-r{self.rank:03d}-{self.seq:06d}.h5", rows)
