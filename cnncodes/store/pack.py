"""`pack`: a sharded store (index + output shards) copied into one ordinary cache file."""

from __future__ import annotations

from pathlib import Path

import h5py

from ..runtime import atomic_path
from .cache import Cache
from .format import ROW_CHUNK

COPY_ROWS = 65536  # rows per block


def pack(index: str | Path, out: str | Path) -> int:
    """Copy a sharded store into one ordinary cache file `out` (atomically); the rows it wrote."""
    index, out = Path(index), Path(out)
    with Cache(index) as cache, atomic_path(out) as tmp, h5py.File(tmp, "w") as dst:
        src = cache.file
        for k, v in src.attrs.items():
            if k not in ("store", "source"):
                dst.attrs[k] = v
        rows = _copy_group(src, dst)  # the splits, and root datasets such as /classes
    return rows


def _copy_group(src: h5py.Group, dst: h5py.Group) -> int:
    """Copy datasets block by block (virtual ones become ordinary, chunked like a merged cache)."""
    rows = 0
    for name, obj in src.items():
        if name == "shards":  # the index's own table of output shards: a packed file has none
            continue
        if isinstance(obj, h5py.Group):
            rows += _copy_group(obj, dst.create_group(name))
            continue
        n = obj.shape[0] if obj.ndim else 0
        chunks = (min(ROW_CHUNK, n), *obj.shape[1:]) if obj.ndim and n else None
        out = dst.create_dataset(name, shape=obj.shape, dtype=obj.dtype, chunks=chunks)
        for lo in range(0, n, COPY_ROWS):
            out[lo:lo + COPY_ROWS] = obj[lo:lo + COPY_ROWS]
        out.attrs.update(obj.attrs)  # description, axes
        if name == "features":
            rows += n
    return rows
