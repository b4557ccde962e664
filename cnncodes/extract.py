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

from . import distributed
from ._version import __version__
from .backbones import (
    create_extractor,
    parse_layers,
    resolve_preprocessing,
    resolve_weights,
)
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
from .gpu_decode import DeviceLoader, resolve_decode
from .manifest import ManifestOptions
from .precision import emulation_note
from .resume import Done, prepare_parts
from .runtime import (
    FileLock,
    autocast,
    check_precision,
    check_space,
    configure_threads,
    inference_batch_size,
    process_cores,
    resolve_device,
)
from .store import (
    Cache,
    CacheConfig,
    SplitPlan,
    SplitRows,
    parts_folder,
    write_cache,
    write_shard,
)
from .uptodate import request_key

JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass
class ExtractResult:
    """What one `extract` call did."""

    cache: Path
    extracted: int = 0  # images run through the network in this call
    codes: int = 0  # rows written by this call (images x views)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # all skipped files in the cache
    seconds: float = 0.0  # wall time of the network pass
    decode: str = "cpu"  # where JPEGs were decoded: "cpu" or "gpu" (nvJPEG)
    decode_fallbacks: int = 0  # with decode "gpu": images nvJPEG did not take, decoded by the CPU path
    up_to_date: bool = False
    split_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # where a fast path did not apply

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
    decode: str = "auto",
    precision: str = "fp32",
    channels_last: bool = True,
    strict: bool = False,
    overwrite: bool = False,
    checkpoint_every: float = 30.0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    manifest: ManifestOptions | None = None,
) -> ExtractResult:
    """Extract CNN codes for every image under `data` (a folder or a CSV manifest read with
    `manifest` options) into the HDF5 cache `out`.

    Resumable (rerun the same call after a crash), incremental (only new or changed
    files are extracted), and refuses to mix configurations unless `overwrite`.
    `batch_size` None = `inference_batch_size(device)` (16 on CPU, 128 on CUDA).
    `decode` "auto" decodes JPEGs on the GPU (nvJPEG) when the network runs on one.
    `layers` ("NAME[,NAME...]"): pooled codes of those intermediate layers, concatenated,
    instead of the classifier's input (`cnncodes archs ARCH --layers` lists the names).
    `preprocess_like`: the weights name whose preprocessing a weights file follows (default DEFAULT's).
    """
    if views < 0 or eval_views < 0 or (batch_size is not None and batch_size < 1):
        raise CnnCodesError("--views/--eval-views must be >= 0 and --batch-size >= 1")
    layout = discover(data, manifest)
    for w in layout.warnings:
        log(f"warning: {w}")
    dev = resolve_device(device)
    batch_size = batch_size or inference_batch_size(dev)
    check_precision(precision, dev)
    decode = resolve_decode(decode, dev)
    info = resolve_weights(arch, weights)
    request = request_key(arch=arch, weights=weights, weights_sha256=info.sha256, image_size=image_size,
                          precision=precision, views=views, eval_views=eval_views, seed=seed, layers=layers,
                          preprocess_like=preprocess_like)
    pre = resolve_preprocessing(arch, info, image_size, preprocess_like)
    layers = parse_layers(arch, layers)
    config = CacheConfig(arch, info.identity, info.name, precision, pre.to_dict(), views, eval_views, seed, layers)
    if strict:
        _fail_on_ignored(layout)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = parts_folder(out)
    dev = distributed.init(dev)
    slow = emulation_note(precision, dev)
    if slow and distributed.is_main():
        log(f"note: {slow}")  # before the run, not after minutes of waiting
    try:
        result = _extract_locked(layout, out, parts, config, info, pre, dev, overwrite, batch_size, workers, decode,
                                 precision, channels_last, strict, checkpoint_every, progress, request, log)
    finally:
        distributed.cleanup()
    for note in result.notes:
        log(f"note: {note}")
    return result


def _extract_locked(layout, out, parts, config, info, pre, dev, overwrite, batch_size, workers, decode, precision, channels_last,
                    strict, checkpoint_every, progress, request, log=print) -> ExtractResult:
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
                prepare_parts(parts, config, overwrite)
            except CnnCodesError as e:
                error = str(e)
        distributed.share_error(error, dev)
        old = _open_existing(out, config, overwrite)
        stack.callback(lambda: old is not None and old.close())
        done = Done.collect(old, parts, layout)
        todo = {s: [f for f in files if not done.has(s, f)] for s, files in layout.splits.items()}
        result = ExtractResult(out, notes=_fast_path_notes(todo))
        if any(todo.values()):
            mine = {s: _deal(files, batch_size) for s, files in todo.items()}
            runner = _Runner(config, info, pre, dev, precision, channels_last, batch_size, workers, decode, strict,
                             log if main else None)
            result.extracted, result.codes, result.seconds = runner.run(layout, mine, parts, checkpoint_every,
                                                                        progress and main)
            result.decode, result.decode_fallbacks = runner.decode, runner.decode_fallbacks
            result.extracted, result.codes, result.seconds = _sum_over_ranks(result, dev)
        if main:
            done = Done.collect(old, parts, layout)
            plans = done.plans(layout)
            if old is not None and not any(todo.values()) and done.unchanged(old, plans, layout):
                result.up_to_date = True
            else:
                dim = done.feature_dim or (old.feature_dim if old is not None else 0)
                versions = {"cnncodes": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}
                check_space(out, _cache_bytes(plans, dim), f"; finished work is kept in {parts}")
                write_cache(out, config, layout.classes, dim, plans, versions, request=request,
                            manifest=layout.manifest)
                shutil.rmtree(parts, ignore_errors=True)
            result.skipped = [(p, r) for plan in plans.values() for p, r in plan.skipped]
            result.split_counts = {s: int(plan.rows) for s, plan in plans.items()}
        distributed.barrier()  # other ranks return only once the cache is complete
    return result


def _fast_path_notes(todo: dict[str, list[ImageFile]]) -> list[str]:
    """Say where a speed trick cannot apply (no silent fallback): the JPEG draft decode
    (reduced DCT scale) exists only for JPEGs; other files are decoded at full size."""
    other = [f.path for files in todo.values() for f in files if Path(f.path).suffix.lower() not in JPEG_SUFFIXES]
    if not other:
        return []
    return [f"the JPEG draft decode (reduced DCT scale) does not apply to {len(other)} non-JPEG file(s) "
            f"(by extension, e.g. {other[0]}): they are decoded at full size, then resized as usual"]


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


class _Runner:
    """Runs the headless backbone over the files still to do, writing shards as it goes."""

    def __init__(self, config, info, pre, dev, precision, channels_last, batch_size, workers, decode, strict, log=None):
        configure_threads(dev)
        self.model, _, self.dim = create_extractor(config.arch, info, layers=config.layers, log=log)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model = self.model.to(dev)
        self.normalize = Normalize(pre.mean, pre.std, channels_last).to(dev)
        self.pre, self.config, self.dev, self.precision = pre, config, dev, precision
        self.batch_size = batch_size
        self.workers, self.decode = workers, decode  # workers None: make_loader sizes them; decode "cpu" or "gpu"
        self.decode_fallbacks = 0
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
        if self.decode == "gpu":
            loader = DeviceLoader(layout.root, paths, self.pre.load, dataset.transform, self.batch_size, self.dev,
                                  self.workers or process_cores())
        else:
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
        self.decode_fallbacks += getattr(loader, "fallbacks", 0)
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
