"""`cnncodes archs`: every arch with its code dim, default crop and whether its weights are offline.

Code dims come from a build on the meta device (no weights allocated); they are cached per
torchvision/timm version in `$XDG_CACHE_HOME/cnncodes/` so later listings are instant.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torchvision

from ..errors import CnnCodesError
from ..runtime import atomic_path
from . import _timm, _torchvision
from ._api import WeightsInfo
from ._build import canonical_arch, code_dim, default_preprocessing, is_timm, weights_cached


@dataclass(frozen=True)
class ArchRow:
    arch: str
    code_dim: int
    crop: int
    resize: int
    interpolation: str
    offline: bool  # the DEFAULT weights are in the local cache


def _dims_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cnncodes" / f"code-dims-tv{torchvision.__version__}.json"


def _cached_dims(archs: list[str]) -> dict[str, int]:
    path = _dims_file()
    try:
        dims = json.loads(path.read_text())
    except (OSError, ValueError):
        dims = {}
    missing = [a for a in archs if a not in dims]
    for a in missing:
        dims[a] = code_dim(a)
    if missing:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(dims, sort_keys=True))
        except (OSError, CnnCodesError):
            pass  # a read-only home: listings are just slower
    return dims


def list_archs(timm_names: list[str] | None = None) -> list[ArchRow]:
    """Rows for every torchvision classification model, plus the given timm names (timm has ~1,600)."""
    archs = list(_torchvision.names()) + [canonical_arch(n if is_timm(n) else _timm.PREFIX + n) for n in timm_names or []]
    dims = _cached_dims([a for a in archs if not is_timm(a)])
    rows = []
    for a in archs:
        pre = default_preprocessing(a, WeightsInfo("none", "none"))
        dim = code_dim(a) if is_timm(a) else dims[a]
        rows.append(ArchRow(a, dim, pre.crop, pre.resize, pre.interpolation, weights_cached(a)))
    return rows


def rows_as_dicts(rows: list[ArchRow]) -> list[dict]:
    return [asdict(r) for r in rows]
