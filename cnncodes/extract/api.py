"""`extract`: one pass of a headless backbone over every image of an input, cached to HDF5.

input -> `sources.ShardSource` (shards) -> headless backbone -> one atomic output shard per input
shard -> an index over them (`extract.sharded`). A killed run loses at most the shard each
process was on; a rerun redoes exactly the shards without a valid output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..backbones import parse_layers, resolve_preprocessing, resolve_weights
from ..config import with_overrides
from ..errors import CnnCodesError
from ..folders import FolderLayout
from ..gpu_decode import device_identity, pil_identity, resolve_decode
from ..manifest import ManifestOptions
from ..precision import emulation_note
from ..runtime import check_precision, inference_batch_size, resolve_device
from ..sources import ShardSource, as_source
from ..store import CacheConfig
from ..uptodate import request_key
from .config import ExtractConfig, shard_decode
from .sharded import extract_shards


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
    data: str | Path | ShardSource,
    out: str | Path,
    config: ExtractConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    manifest: ManifestOptions | None = None,
    **overrides: Any,
) -> ExtractResult:
    """Extract CNN codes for every image of `data` into the sharded store `out` (an index over one
    output shard per input shard, see `store.sharded`). `data`: a folder, a CSV manifest read with
    `manifest` options, WebDataset shards (a pattern, list or JSON spec), or any `ShardSource`.

    The options are `config` (default `ExtractConfig()`) with `overrides`, any of its fields by
    name (`extract(data, out, arch="densenet121", weights="none")`); `overwrite`, `progress` and
    `log` steer the call. Resumable (rerun the same call after a crash: finished shards are kept),
    incremental (only shards with new or changed files are extracted), and refuses to mix
    configurations unless `overwrite`. `batch_size` None = `inference_batch_size(device)` (16 on
    CPU, 128 on CUDA). `decode` "auto" decodes JPEG files on the GPU (nvJPEG) when the network runs
    on one. `layers` ("NAME[,NAME...]"): pooled codes of those intermediate layers, concatenated,
    instead of the classifier's input (`cnncodes archs ARCH --layers` lists the names).
    `preprocess_like`: the weights name whose preprocessing a weights file follows (default: the
    published weights it is, by sha256, else the arch's original recipe; `log` says which).
    """
    options = with_overrides(ExtractConfig, config, overrides, "extract")
    source = as_source(data, manifest, options.shard_size)
    layout = getattr(source, "layout", None)  # a folder or CSV manifest
    for w in layout.warnings if layout else []:
        log(f"warning: {w}")
    dev = resolve_device(options.device)
    check_precision(options.precision, dev)
    decode = resolve_decode(options.decode, dev) if layout else shard_decode(options.decode)
    options = dataclasses.replace(options, batch_size=options.batch_size or inference_batch_size(dev), decode=decode)
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
        r = extract_shards(source, out, options, cache, info, pre, dev, overwrite, progress, request, log)
    finally:
        distributed.cleanup()
    result = _result(out, r, options.decode, cache, layout is not None)
    for note in result.notes:
        log(f"note: {note}")
    return result


def _result(out: Path, r: dict, decode: str, cache: CacheConfig, files: bool) -> ExtractResult:
    """What `extract_shards` did, as an ExtractResult (`files`: the input is image files)."""
    report = r["report"]
    result = ExtractResult(out, extracted=report.images, codes=report.codes, skipped=r["skipped"],
                           seconds=report.seconds, decode=decode, up_to_date=r["up_to_date"],
                           split_counts=r["split_counts"], failed_shards=report.failed,
                           shards={"done": r["done"], "extracted": report.shards, "redone": dict(report.redone),
                                   "failed": len(report.failed)})
    stats = report.decode_stats
    result.fallbacks = dict(stats.reasons)
    result.decoders = {k: n for k, n in ((cache.decode, stats.device), (pil_identity(), stats.cpu)) if n}
    if report.not_jpeg:
        what = "file(s) (by extension" if files else "sample(s) (by format"
        result.notes.append(draft_note(f"{report.not_jpeg} non-JPEG {what}, e.g. {report.not_jpeg_example})"))
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


def draft_note(what: str) -> str:
    """The note for images the JPEG draft decode cannot speed up (folders and shards alike)."""
    return (f"the JPEG draft decode (reduced DCT scale) does not apply to {what}: they are decoded at full size, "
            f"then resized as usual")


def _fail_on_ignored(layout: FolderLayout) -> None:
    for split, entries in layout.ignored.items():
        if entries:
            path, reason = entries[0]
            raise CnnCodesError(f"{layout.root / path}: {reason} (--strict: remove or fix the file, or drop --strict to skip it)")

