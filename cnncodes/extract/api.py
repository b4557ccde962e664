"""`extract`: one pass of a headless backbone over an image folder, cached to HDF5.

images -> `data.ImageFiles` -> headless backbone -> shards in `<cache>.parts/` -> one cache.
Shards are flushed at batch boundaries every `checkpoint_every` seconds, so a killed
run loses at most that much work and a rerun recomputes exactly the same batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..backbones import parse_layers, resolve_preprocessing, resolve_weights
from ..config import with_overrides
from ..data import FolderLayout, ImageFile, discover
from ..errors import CnnCodesError
from ..folders import JPEG_SUFFIXES
from ..gpu_decode import device_identity, pil_identity, resolve_decode
from ..manifest import ManifestOptions
from ..precision import emulation_note
from ..resume import Done, prepare_parts
from ..runtime import FileLock, check_precision, check_space, inference_batch_size, resolve_device
from ..store import Cache, CacheConfig, SplitPlan, parts_folder, read_computed, write_cache
from ..uptodate import request_key
from ..webdata import ShardSource, is_shard_input, source_from_cli
from .config import ExtractConfig, shard_decode
from .runner import Runner, library_versions



@dataclass
class ExtractResult:
    """What one `extract` call did."""

    cache: Path
    extracted: int = 0  # images run through the network in this call
    codes: int = 0  # rows written by this call (images x views)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # all skipped files in the cache
    seconds: float = 0.0  # wall time of the network pass
    decode: str = "cpu"  # where JPEGs were decoded: "cpu" or "gpu" (nvJPEG)
    decoders: dict[str, int] = field(default_factory=dict)  # decoder identity -> images it decoded in this call
    fallbacks: dict[str, int] = field(default_factory=dict)  # with decode "gpu": why images went to the CPU path
    up_to_date: bool = False
    split_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # where a fast path did not apply
    shards: dict | None = None  # WebDataset input: input shards done before, extracted, redone (why), failed
    failed_shards: list[tuple[str, str]] = field(default_factory=list)  # (input shard, reason): not in the index

    @property
    def decode_fallbacks(self) -> int:
        """Images the device decoder did not take (decoded, or found unreadable, by the CPU path)."""
        return sum(self.fallbacks.values())

    @property
    def images_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0


def extract(
    data: str | Path,
    out: str | Path,
    config: ExtractConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    manifest: ManifestOptions | None = None,
    **overrides: Any,
) -> ExtractResult:
    """Extract CNN codes for every image under `data` (a folder, a CSV manifest read with
    `manifest` options, or WebDataset shards: a `webdata.ShardSource`) into the HDF5 cache `out`
    (for shards: an index over one output shard per input shard, see `store.sharded`).

    The options are `config` (default `ExtractConfig()`) with `overrides`, any of its fields by
    name (`extract(data, out, arch="densenet121", weights="none")`); `overwrite`, `progress` and
    `log` steer the call. Resumable (rerun the same call after a crash), incremental (only new or
    changed files are extracted), and refuses to mix configurations unless `overwrite`.
    `batch_size` None = `inference_batch_size(device)` (16 on CPU, 128 on CUDA). `decode` "auto"
    decodes JPEGs on the GPU (nvJPEG) when the network runs on one. `layers` ("NAME[,NAME...]"):
    pooled codes of those intermediate layers, concatenated, instead of the classifier's input
    (`cnncodes archs ARCH --layers` lists the names). `preprocess_like`: the weights name whose
    preprocessing a weights file follows (default: the published weights it is, by sha256, else the
    arch's original recipe; `log` says which).
    """
    options = with_overrides(ExtractConfig, config, overrides, "extract")
    if not isinstance(data, ShardSource) and is_shard_input(data):  # a tar pattern, shard list or JSON spec
        data = source_from_cli(str(data), None, None, "cls", None)  # as the CLI reads it (labels from .cls)
    shards = data if isinstance(data, ShardSource) else None  # WebDataset input: see extract.sharded
    layout = None if shards else discover(data, manifest)
    for w in layout.warnings if layout else []:
        log(f"warning: {w}")
    dev = resolve_device(options.device)
    check_precision(options.precision, dev)
    options = dataclasses.replace(options, batch_size=options.batch_size or inference_batch_size(dev),
                                  decode=shard_decode(options.decode) if shards else resolve_decode(options.decode, dev))
    info = resolve_weights(options.arch, options.weights)
    request = request_key(weights_sha256=info.sha256, **options.request())
    pre = resolve_preprocessing(options.arch, info, options.image_size, options.preprocess_like,
                                log if distributed.is_main() else None)
    cache = CacheConfig(options.arch, info.identity, info.name, options.precision, _pre_record(pre, options.decode),
                        options.views, options.eval_views, options.seed, parse_layers(options.arch, options.layers),
                        _decoder(options.decode, dev))
    if options.strict and layout is not None:
        _fail_on_ignored(layout)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = distributed.init(dev)
    slow = emulation_note(options.precision, dev)
    if slow and distributed.is_main():
        log(f"note: {slow}")  # before the run, not after minutes of waiting
    try:
        if shards is not None:
            result = _extract_from_shards(shards, out, options, cache, info, pre, dev, overwrite, progress, request, log)
        else:
            result = _extract_locked(layout, out, options, cache, info, pre, dev, overwrite, progress, request, log)
    finally:
        distributed.cleanup()
    for note in result.notes:
        log(f"note: {note}")
    return result


def _extract_from_shards(source, out, options, cache, info, pre, dev, overwrite, progress, request, log) -> ExtractResult:
    """`extract` on WebDataset shards (extract.sharded), as an ExtractResult."""
    from .sharded import extract_shards

    r = extract_shards(source, out, options, cache, info, pre, dev, overwrite, progress, request, log)
    report = r["report"]
    result = ExtractResult(out, extracted=report.images, codes=report.codes, skipped=r["skipped"],
                           seconds=report.seconds, decode="cpu", up_to_date=r["up_to_date"],
                           split_counts=r["split_counts"], failed_shards=report.failed,
                           shards={"done": r["done"], "extracted": report.shards, "redone": dict(report.redone),
                                   "failed": len(report.failed)})
    if report.not_jpeg:
        result.notes.append(draft_note(f"{report.not_jpeg} non-JPEG sample(s)"))
    return result


def _extract_locked(layout, out, options, cache, info, pre, dev, overwrite, progress, request, log=print) -> ExtractResult:
    """The body of `extract`: under torchrun every rank runs it, rank 0 alone locks and merges."""
    main = distributed.is_main()
    parts = parts_folder(out)
    with contextlib.ExitStack() as stack:
        error = None
        if main:  # one writer per cache: a second run is refused before any work
            try:
                stack.enter_context(FileLock(out, what=f"cache {out}"))
                checked = _open_existing(out, cache, overwrite)  # refuses a mismatched config early
                if checked is not None:
                    checked.close()
                prepare_parts(parts, cache, overwrite)
            except CnnCodesError as e:
                error = str(e)
        distributed.share_error(error, dev)
        old = _open_existing(out, cache, overwrite)
        stack.callback(lambda: old is not None and old.close())
        done = Done.collect(old, parts, layout)
        if done.torn and main:
            log(f"note: {len(done.torn)} shard(s) torn by an interrupted write (e.g. {done.torn[0].name}) were "
                f"removed; their images are extracted again")
        todo = {s: [f for f in files if not done.has(s, f)] for s, files in layout.splits.items()}
        result = ExtractResult(out, notes=_fast_path_notes(todo))
        computed = read_computed(out) if old is not None else {}  # a merge-only run carries it over
        if any(todo.values()):
            mine = {s: _deal(files, options.batch_size) for s, files in todo.items()}
            runner = Runner(options, cache, info, pre, dev, log if main else None)
            computed = runner.computed_with
            result.extracted, result.codes, result.seconds = runner.run(layout, mine, parts, progress and main)
            stats = runner.decode_stats
            result.decode, result.fallbacks = options.decode, dict(stats.reasons)
            result.decoders = {k: n for k, n in ((cache.decode, stats.device), (pil_identity(), stats.cpu)) if n}
            result.extracted, result.codes, result.seconds = _sum_over_ranks(result, dev)
        if main:
            done = Done.collect(old, parts, layout)
            plans = done.plans(layout)
            if old is not None and not any(todo.values()) and done.unchanged(old, plans, layout):
                result.up_to_date = True
            else:
                dim = done.feature_dim or (old.feature_dim if old is not None else 0)
                check_space(out, _cache_bytes(plans, dim), f"; finished work is kept in {parts}")
                write_cache(out, cache, layout.classes, dim, plans, library_versions(), request=request,
                            manifest=layout.manifest, computed=computed)
                shutil.rmtree(parts, ignore_errors=True)
            result.skipped = [(p, r) for plan in plans.values() for p, r in plan.skipped]
            result.split_counts = {s: int(plan.rows) for s, plan in plans.items()}
        distributed.barrier()  # other ranks return only once the cache is complete
    return result


def _decoder(decode: str, dev: torch.device) -> str:
    """The decoder the cache records: part of its identity (device and CPU decodes differ slightly)."""
    return device_identity(dev) if decode == "gpu" else pil_identity()


def _pre_record(pre, decode: str) -> dict:
    """The preprocessing the cache records; on the device path JPEGs are decoded at full size."""
    record = pre.to_dict()
    if decode == "gpu":
        record["jpeg_draft"] = (f"device-decoded JPEGs at full size; CPU fallbacks at the smallest DCT scale "
                                f"keeping both sides >= {pre.draft_size}")
        record["resampler"] = "torch antialiased resize: float16 on the device, uint8 for CPU fallbacks"
    return record


def _fast_path_notes(todo: dict[str, list[ImageFile]]) -> list[str]:
    """Say where a speed trick cannot apply (no silent fallback): the JPEG draft decode
    (reduced DCT scale) exists only for JPEGs; other files are decoded at full size."""
    other = [f.path for files in todo.values() for f in files if Path(f.path).suffix.lower() not in JPEG_SUFFIXES]
    return [draft_note(f"{len(other)} non-JPEG file(s) (by extension, e.g. {other[0]})")] if other else []


def draft_note(what: str) -> str:
    """The note for images the JPEG draft decode cannot speed up (folders and shards alike)."""
    return (f"the JPEG draft decode (reduced DCT scale) does not apply to {what}: they are decoded at full size, "
            f"then resized as usual")


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


