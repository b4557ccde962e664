"""`select`: images -> one cache per backbone -> the head chosen among them by grouped CV on train.

`parse_backbones("resnet50=W1.pth,timm:tf_efficientnet_lite2=W2.pth")` -> [Backbone]; `select_backbone`
extracts each into OUT/<name>.h5 with `cnncodes.extract.extract` (resumable: a rerun skips finished
caches and finishes an interrupted one), one at a time, then runs `heads.multi.fit_head_multi` on the
caches and writes OUT/head.h5 and OUT/report.json. Preprocessing is resolved per backbone as
`extract` resolves it (the weights' own, or `@LIKE`'s for a weights file).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CnnCodesError

SPEC_HELP = ("ARCH[=WEIGHTS][@LIKE],...: torchvision or timm:NAME archs, each with its weights (a name, a local "
             "file or none; default DEFAULT) and, for a weights file, the named weights whose preprocessing it "
             "follows (e.g. resnet50=w.pth@IMAGENET1K_V1)")
HEAD_NAME = "head.h5"
REPORT_NAME = "report.json"


@dataclass(frozen=True)
class Backbone:
    """One backbone to extract: the cache is OUT/<name>.h5."""

    name: str
    arch: str
    weights: str = "DEFAULT"
    preprocess_like: str | None = None


def parse_backbones(spec: str) -> list[Backbone]:
    """`ARCH[=WEIGHTS][@LIKE]` items, comma-separated; anything else is one CnnCodesError line."""
    from .backbones import check_arch

    items = [s.strip() for s in spec.split(",")]
    if not spec.strip() or not all(items):
        raise CnnCodesError(f"--arch {spec!r}: an empty backbone; expected {SPEC_HELP}")
    out, names = [], set()
    for item in items:
        arch, _, weights = item.partition("=")
        weights, _, like = weights.partition("@")
        arch, weights, like = arch.strip(), weights.strip(), like.strip()
        if not arch or ("=" in item and not weights) or ("@" in item and not like) or "=" in weights:
            raise CnnCodesError(f"--arch: cannot parse {item!r}; expected {SPEC_HELP}")
        check_arch(arch)
        name = arch.replace("timm:", "timm-").replace(":", "-").replace("/", "-")
        if name in names:  # the same arch with other weights: number the caches
            name = f"{name}-{sum(b.arch == arch for b in out) + 1}"
        names.add(name)
        out.append(Backbone(name, arch, weights or "DEFAULT", like or None))
    if len(out) < 2:
        raise CnnCodesError(f"--arch {spec!r}: one backbone; select chooses among two or more "
                            f"(for one, use `cnncodes extract` and `cnncodes fit-head`)")
    return out


def check_backbones(backbones: Sequence[Backbone], config) -> None:
    """Resolve every backbone's weights and preprocessing before any extraction (errors come first)."""
    from .backbones import resolve_preprocessing, resolve_weights

    seen = {}
    for b in backbones:
        dataclasses.replace(config, arch=b.arch, weights=b.weights, preprocess_like=b.preprocess_like)  # validated
        info = resolve_weights(b.arch, b.weights)
        resolve_preprocessing(b.arch, info, config.image_size, b.preprocess_like)
        key = (b.arch, info.identity, b.preprocess_like)
        if key in seen:
            raise CnnCodesError(f"--arch: {seen[key]} and {b.name} are the same backbone and weights; name each once")
        seen[key] = b.name


def select_backbone(data: str | Path, out_dir: str | Path, backbones: Sequence[Backbone], extract_config=None,
                    head_config=None, clfs: Sequence[str] | None = None, concat: bool = False,
                    show_all_val: bool = False, progress: bool = True,
                    log: Callable[[str], None] = print):
    """Extract each backbone (resumable), choose the head among them by CV on train, save head and report.

    Returns (head, report); the report is the multi-cache fit-head report plus "backbones": per
    backbone its cache, preprocessing, extraction and CV seconds.
    """
    from .extract import ExtractConfig, extract
    from .heads.config import HeadConfig
    from .heads.format import holds_a_head
    from .heads.multi import fit_head_multi
    from .runtime import check_replaceable

    extract_config = extract_config or ExtractConfig()
    head_config = head_config or HeadConfig()
    out_dir = Path(out_dir)
    check_backbones(backbones, extract_config)
    if out_dir.exists() and not out_dir.is_dir():
        raise CnnCodesError(f"{out_dir}: a file, not a folder; -o names the folder for the caches, head and report")
    check_replaceable(out_dir / HEAD_NAME, "head file", holds_a_head, [])
    start = time.perf_counter()
    timings = []
    for b in backbones:
        cache = out_dir / f"{b.name}.h5"
        log(f"[{b.name}] extract {b.arch} ({b.weights}) -> {cache}")
        t = time.perf_counter()
        cfg = dataclasses.replace(extract_config, arch=b.arch, weights=b.weights, preprocess_like=b.preprocess_like)
        r = extract(data, cache, cfg, progress=progress, log=log)
        timings.append({"name": b.name, "arch": b.arch, "weights": b.weights, "preprocess_like": b.preprocess_like,
                        "cache": str(cache), "extracted": r.extracted, "up_to_date": r.up_to_date,
                        "extract_seconds": round(time.perf_counter() - t, 3)})
    head, report = fit_head_multi([t["cache"] for t in timings], clfs, config=head_config, concat=concat,
                                  show_all_val=show_all_val, log=log)
    for t, c in zip(timings, report["caches"]):
        t["preprocessing"] = c["preprocessing"]
        t["cv_seconds"] = round(sum(x["fit_seconds"] for x in report["candidates"]
                                    if x["name"] == c["name"] and not x["fused"]), 3)
        t["seconds"] = round(t["extract_seconds"] + t["cv_seconds"], 3)
    report["backbones"] = timings
    report["select_seconds"] = round(time.perf_counter() - start, 3)
    head.save(out_dir / HEAD_NAME)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return head, report
