"""The sharded store: one output shard per input shard, and an index presenting them as one cache.

    codes.h5                  the index: a cache's root attributes, and per split
                              features/labels/paths/views as HDF5 virtual datasets over the shards
    codes.shards/<split>/<input shard name>.h5
                              one output shard per input shard, written atomically, its root
                              attributes saying what it came from (see `write_output_shard`)

The index stores shard paths relative to its own folder (HDF5 resolves a relative virtual
source against the virtual file's folder), so the store can move as a whole. Readers (h5py,
`Cache`, the heads) see ordinary datasets; `store.pack` materialises one ordinary cache file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import CnnCodesError
from ..runtime import atomic_path
from .format import STR, CacheConfig, SplitRows, describe_split, read_table, write_root_attrs, write_table
from .shards import read_shard, write_shard

SHARD_FORMAT = "cnncodes-shard"
STORE = "sharded"  # the index's `store` attribute
# name -> (dtype, per-row shape or None for the code width, fill value of a row no shard provides:
# NaN codes and label -1 make a missing source loud, never a silent zero).
ROW_DATASETS = {"features": (np.float32, None, np.nan), "labels": (np.int64, (), -1),
                "paths": (STR, (), None), "views": (np.int16, (), -1)}


def shards_folder(out: str | Path) -> Path:
    """Where the output shards of the index `out` live (codes.h5 -> codes.shards/)."""
    out = Path(out)
    return out.with_name(out.stem + ".shards")


def output_shard(folder: Path, split: str, stem: str) -> Path:
    return folder / split / f"{stem}.h5"


def write_output_shard(path: Path, rows: SplitRows, origin: dict) -> None:
    """Write one finished input shard's rows atomically, with `origin` (source, source_size,
    source_mtime_ns, samples, config, input, split, max_label) as root attributes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_shard(path, rows, {"format": SHARD_FORMAT, **origin})


@dataclass
class ShardEntry:
    """A finished output shard as the index needs it."""

    path: Path
    rows: int
    feature_dim: int
    max_label: int
    origin: dict
    skipped: list[tuple[str, str]]


def read_output_shard(path: Path) -> ShardEntry | None:
    """A finished output shard's entry; None when absent or proven torn (then it is redone).

    Raises ShardUnreadable when it exists but cannot be read now (every shard is kept)."""
    if not path.exists():
        return None
    f = read_shard(path)
    if f is None:
        return None
    with f:
        if f.attrs.get("format") != SHARD_FORMAT:
            return None
        origin = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        feats = f["features"]
        return ShardEntry(path, int(feats.shape[0]), int(feats.shape[1]), int(origin.get("max_label", -1)), origin,
                          read_table(f, "skipped"))


def write_index(out: Path, config: CacheConfig, classes: list[str], feature_dim: int,
                splits: dict[str, list[ShardEntry]], ignored: dict[str, list[tuple[str, str]]],
                versions: dict[str, str], request: str, source: dict, computed: dict | None = None,
                manifest: dict | None = None) -> None:
    """Write the index atomically: the root attributes of a cache and, per split, virtual row
    datasets over the shards in order, the input shards (`files`), the output shards (`shards`,
    with each one's origin and skipped count: what a rerun's plan needs, without opening them) and
    the skipped samples (each shard's in order, then `ignored`: inputs no shard read)."""
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        write_root_attrs(f, config, classes, feature_dim, versions, request, manifest, computed)
        f.attrs["store"] = STORE
        f.attrs["source"] = json.dumps(source, sort_keys=True)
        for split, entries in splits.items():
            g = f.create_group(split)
            _virtual_rows(g, out.parent, entries, feature_dim)
            describe_split(g)
            write_table(g, "files", [(e.origin["source"], e.origin["source_size"], e.origin["source_mtime_ns"])
                                     for e in entries], ("paths", "size", "mtime_ns"))
            write_table(g, "skipped", [s for e in entries for s in e.skipped] + list(ignored.get(split, [])),
                        ("paths", "reasons"))
            stats = [e.path.stat() for e in entries]
            write_table(g, "shards", [(os.path.relpath(e.path, out.parent), s.st_size, s.st_mtime_ns)
                                      for e, s in zip(entries, stats)], ("paths", "size", "mtime_ns"))
            g["shards"].create_dataset("rows", data=np.array([e.rows for e in entries], np.int64))
            g["shards"].create_dataset("skipped", data=np.array([len(e.skipped) for e in entries], np.int64))
            g["shards"].create_dataset("origin", data=np.array([_origin_json(e.origin) for e in entries],
                                                               dtype=object), dtype=STR)


def _origin_json(origin: dict) -> str:
    """A shard's origin as the index keeps it: the configuration is the index's own (stored once)."""
    return json.dumps({k: v for k, v in origin.items() if k not in ("config", "format", "written_ns")}, sort_keys=True)


def indexed_entries(out: Path, config: CacheConfig) -> dict[Path, ShardEntry]:
    """The output shards an existing index of this configuration names, as entries, for those whose
    file still has the size and mtime the index recorded (the others are read again): a rerun's
    plan over 10^4 shards is then one stat each, not one open each. {} without a usable index."""
    try:
        with h5py.File(out, "r") as f:
            if not is_index(f) or config.differences(CacheConfig.from_json(f.attrs["config"])):
                return {}
            dim, own = int(f.attrs["feature_dim"]), str(f.attrs["config"])
            found = {}
            for split in f:
                g = f[split]
                if isinstance(g, h5py.Group) and "shards/origin" in g:
                    found.update(_split_entries(out.parent, g, dim, own))
            return found
    except (OSError, KeyError, ValueError, TypeError):
        return {}


def _split_entries(folder: Path, g: h5py.Group, dim: int, config: str) -> dict[Path, ShardEntry]:
    s = g["shards"]
    skipped = read_table(g, "skipped")
    counts = s["skipped"][()].tolist()
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    found = {}
    for i, ((rel, size, mtime), rows, origin) in enumerate(zip(index_shards(g), s["rows"][()].tolist(),
                                                                s["origin"].asstr()[()])):
        path = folder / rel
        try:
            st = path.stat()
        except OSError:
            continue
        if (st.st_size, st.st_mtime_ns) == (size, mtime):
            o = {**json.loads(origin), "config": config}
            found[path] = ShardEntry(path, int(rows), dim, int(o.get("max_label", -1)), o,
                                     [tuple(x) for x in skipped[starts[i]:starts[i + 1]]])
    return found


def _virtual_rows(g: h5py.Group, folder: Path, entries: list[ShardEntry], dim: int) -> None:
    n = sum(e.rows for e in entries)
    for name, (dtype, shape, fill) in ROW_DATASETS.items():
        row = (dim,) if shape is None else shape
        if n == 0:  # a virtual dataset needs a source: an empty split is an ordinary empty dataset
            g.create_dataset(name, shape=(0, *row), dtype=dtype)
            continue
        layout = h5py.VirtualLayout(shape=(n, *row), dtype=dtype)
        at = 0
        for e in entries:
            if e.rows:
                src = h5py.VirtualSource(os.path.relpath(e.path, folder), name, shape=(e.rows, *row), dtype=dtype)
                layout[at:at + e.rows] = src
                at += e.rows
        g.create_virtual_dataset(name, layout, fillvalue=fill)


def index_shards(g: h5py.Group) -> list[tuple[str, int, int]]:
    """The output shards an index split names: (path relative to the index, size, mtime_ns)."""
    if "shards" not in g:
        return []
    s = g["shards"]
    return list(zip(s["paths"].asstr()[()], s["size"][()].tolist(), s["mtime_ns"][()].tolist()))


def is_index(f: h5py.File) -> bool:
    return f.attrs.get("store") == STORE


def check_sources(path: Path, f: h5py.File) -> None:
    """Every shard a sharded index names must exist and be openable at once, or HDF5 reads fill
    values in silence: refuse a missing shard, and raise the open-files limit to fit them."""
    names: set[str] = set()
    for split in f:
        ds = f[split].get("features") if isinstance(f[split], h5py.Group) else None
        if ds is not None and ds.is_virtual:
            names.update(m.file_name for m in ds.virtual_sources())
    recorded = {rel: (size, mtime) for split in f if isinstance(f[split], h5py.Group) for rel, size, mtime in index_shards(f[split])}
    for name in sorted(names):
        try:
            st = (path.parent / name).stat()
        except FileNotFoundError:
            raise CnnCodesError(f"{path}: the shard {path.parent / name} it names is missing; rerun the same "
                                f"`cnncodes extract` to redo it (or restore the {shards_folder(path).name} folder beside it)") from None
        if name in recorded and recorded[name][0] != st.st_size:
            # its rows may no longer be those the index maps (HDF5 would pad or cut them silently);
            # the size only: a copy of the store (cp -r, rsync) keeps sizes, not always mtimes
            raise CnnCodesError(f"{path}: the shard {path.parent / name} was rewritten after this index; rerun the "
                                f"same `cnncodes extract` to index it again")
    _ensure_open_files(path, len(names) + 64)


def _ensure_open_files(path: Path, needed: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise CnnCodesError(f"{path}: reading its {needed - 64} shards needs about {needed} open files, the hard limit "
                            f"is {hard}; raise it (ulimit -Hn) or read a packed copy (`cnncodes pack {path} -o FILE`)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
