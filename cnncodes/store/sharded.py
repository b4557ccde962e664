"""The sharded store: one output shard per input shard, and an index presenting them as one cache.

    codes.h5                  the index: a cache's root attributes, and per split
                              features/labels/paths/views as HDF5 virtual datasets over the shards
    codes.shards/<split>/<input shard name>.h5
                              one output shard per input shard, written atomically, its root
                              attributes saying what it came from (see `write_output_shard`)

The index stores shard paths relative to its own folder (HDF5 resolves a relative virtual
source against the virtual file's folder), so the store can move as a whole; its virtual sources
go through the store's marker folder (`codes.shards/.store-<id>/../train/x.h5`, see
`_store_marker`), a path that exists nowhere else: HDF5's fallback to the working directory
cannot read another store's shard. Each shard has a random `shard_id` the index records, so a
file of the same size put in its place is refused (`check_sources`). Readers (h5py,
`Cache`, the heads) see ordinary datasets; `store.pack` materialises one ordinary cache file.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import CnnCodesError
from ..runtime import atomic_path, check_space
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


def write_output_shard(path: Path, rows: SplitRows, origin: dict) -> str:
    """Write one finished input shard's rows atomically, with `origin` (source, source_size,
    source_mtime_ns, samples, config, input, split, max_label) as root attributes, and a random
    `shard_id` the index records (a same-size file in its place is then told apart: see
    `check_sources`). Returns the id, also set in `origin` so an entry built from it carries it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # HDF5 does not recover well from a write that fails midway: refuse up front where the disk or
    # the file size limit is short (a generous estimate: the codes, ~200 bytes a row, 64 KiB of metadata)
    check_space(path, rows.features.nbytes + 200 * len(rows.paths) + 300 * len(rows.files) + (64 << 10),
                "; finished shards are kept")
    origin["shard_id"] = uuid.uuid4().hex
    write_shard(path, rows, {"format": SHARD_FORMAT, **origin})
    return origin["shard_id"]


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
    marker = _store_marker(out, [e for es in splits.values() for e in es])
    image = io.BytesIO()  # built in memory, written with plain file I/O (see `shards.write_shard`)
    with h5py.File(image, "w") as f:
        write_root_attrs(f, config, classes, feature_dim, versions, request, manifest, computed)
        f.attrs["store"] = STORE
        f.attrs["source"] = json.dumps(source, sort_keys=True)
        for split, entries in splits.items():
            g = f.create_group(split)
            _virtual_rows(g, out.parent, entries, feature_dim, marker)
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
            g["shards"].create_dataset("id", data=np.array([_entry_id(e) for e in entries], dtype=object), dtype=STR)
    with atomic_path(out) as tmp:
        tmp.write_bytes(image.getbuffer())


def _origin_json(origin: dict) -> str:
    """A shard's origin as the index keeps it: the configuration is the index's own and the id in its
    own column (each stored once)."""
    return json.dumps({k: v for k, v in origin.items() if k not in ("config", "format", "written_ns", "shard_id")},
                      sort_keys=True)


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
    ids = index_shard_ids(g) or [""] * len(counts)
    for i, ((rel, size, mtime), rows, origin) in enumerate(zip(index_shards(g), s["rows"][()].tolist(),
                                                                s["origin"].asstr()[()])):
        path = folder / rel
        try:
            st = path.stat()
        except OSError:
            continue
        if (st.st_size, st.st_mtime_ns) == (size, mtime):
            o = {**json.loads(origin), "config": config, **({"shard_id": ids[i]} if ids[i] else {})}
            found[path] = ShardEntry(path, int(rows), dim, int(o.get("max_label", -1)), o,
                                     [tuple(x) for x in skipped[starts[i]:starts[i + 1]]])
    return found


def _entry_id(e: ShardEntry) -> str:
    """The `shard_id` of an entry's shard: from its origin, else (an entry built without it) its file."""
    return str(e.origin.get("shard_id") or _shard_id(e.path) or "")


def _shard_id(path: Path) -> str | None:
    """The `shard_id` root attribute of an output shard; None when absent or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            v = f.attrs.get("shard_id")
    except OSError:
        return None
    return v.decode() if isinstance(v, bytes) else (None if v is None else str(v))


MARKER_PREFIX = ".store-"
MARKER_README = ("This folder makes the paths by which the index beside this folder names its shards\n"
                 "unique to this store: codes.shards/.store-ID/../train/x.h5 resolves only here, so HDF5,\n"
                 "which falls back to the working directory, never reads another store's shard. Keep it.\n")


def _store_marker(out: Path, entries: list[ShardEntry]) -> str | None:
    """The marker folder `<shards folder>/.store-<id>/` the index's virtual sources go through (made
    once per store, reused by every later index). HDF5 resolves a relative source against the index's
    folder, then against the working directory: `codes.shards/train/x.h5` could be another store's
    file there (where this one's is missing or unreadable, or HDF5_VDS_PREFIX points elsewhere);
    `codes.shards/.store-<id>/../train/x.h5` exists only in a folder holding this marker.
    None (plain relative paths) when the shards do not all lie in the shards folder."""
    folder = Path(os.path.abspath(shards_folder(out)))
    if not entries or not all(folder in Path(os.path.abspath(e.path)).parents for e in entries):
        return None
    found = sorted(p.name for p in folder.glob(MARKER_PREFIX + "*") if p.is_dir())
    if found:
        return found[0]
    name = MARKER_PREFIX + uuid.uuid4().hex[:16]
    (folder / name).mkdir()
    (folder / name / "README").write_text(MARKER_README)
    return name


def _source_path(rel: str, marker: str | None) -> str:
    """A shard's path as the index's virtual sources name it: `rel` (relative to the index's folder)
    through the store's marker folder (`codes.shards/.store-<id>/../train/x.h5`)."""
    if marker is None:
        return rel
    head, _, tail = rel.partition(os.sep)
    return os.path.join(head, marker, os.pardir, tail)


def _marker_of(name: str) -> str | None:
    """The marker folder a virtual source name goes through (relative to the index), if any."""
    parts = name.split(os.sep)
    if len(parts) > 3 and parts[1].startswith(MARKER_PREFIX) and parts[2] == os.pardir:
        return os.path.join(parts[0], parts[1])
    return None


def _virtual_rows(g: h5py.Group, folder: Path, entries: list[ShardEntry], dim: int, marker: str | None = None) -> None:
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
                src = h5py.VirtualSource(_source_path(os.path.relpath(e.path, folder), marker), name,
                                         shape=(e.rows, *row), dtype=dtype)
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


def unique_shard_paths(f: h5py.File) -> bool:
    """Whether every virtual source of the index goes through its store's marker folder; False for an
    index of an older cnncodes (plain relative paths, which HDF5 may resolve in the working directory)."""
    for split in f:
        ds = f[split].get("features") if isinstance(f[split], h5py.Group) else None
        if ds is not None and ds.is_virtual and not all(_marker_of(m.file_name) for m in ds.virtual_sources()):
            return False
    return True


def index_shard_ids(g: h5py.Group) -> list[str] | None:
    """The `shard_id` of each output shard an index split names, in `index_shards` order; None for
    an index written before shards had one."""
    s = g.get("shards")
    return None if s is None or "id" not in s else list(s["id"].asstr()[()])


def check_sources(path: Path, f: h5py.File) -> None:
    """Every shard a sharded index names must be the file it indexed, or HDF5 reads fill values (a
    missing shard) or other rows (a changed one) in silence: refuse a missing shard, one whose size
    changed, and one whose mtime changed that is not the shard it indexed (its `shard_id`: a copy
    of the store keeps sizes, not always mtimes, so a changed mtime alone is no proof); raise the
    open-files limit to fit them. Nothing changed: one stat per shard, none is opened."""
    names: set[str] = set()
    recorded: dict[str, tuple[int, int, str | None]] = {}
    for split in f:
        g = f[split]
        if not isinstance(g, h5py.Group):
            continue
        ds = g.get("features")
        if ds is not None and ds.is_virtual:
            names.update(m.file_name for m in ds.virtual_sources())
        ids = index_shard_ids(g)
        for i, (rel, size, mtime) in enumerate(index_shards(g)):
            recorded[os.path.normpath(rel)] = (size, mtime, ids[i] if ids else None)
    if names and not any(_marker_of(n) for n in names) and os.environ.get("HDF5_VDS_PREFIX"):
        raise CnnCodesError(f"{path}: HDF5_VDS_PREFIX is set, and HDF5 looks there first for the shards of this index "
                            f"(written by an older cnncodes, its shard paths are not unique to its store); unset it, "
                            f"or rerun the same `cnncodes extract` to index it again")
    folder = str(path.parent)  # strings, not Paths: 10^4 shards are checked on every open
    for name in sorted(names):
        rel = os.path.normpath(name)
        shard = os.path.join(folder, rel)
        try:
            st = os.stat(os.path.join(folder, name))
        except FileNotFoundError:
            marker = _marker_of(name)
            if marker and os.path.exists(shard):
                raise CnnCodesError(f"{path}: the folder {path.parent / marker} that names its shards is missing; rerun "
                                    f"the same `cnncodes extract` to index them again") from None
            raise CnnCodesError(f"{path}: the shard {shard} it names is missing; rerun the same "
                                f"`cnncodes extract` to redo it (or restore the {shards_folder(path).name} folder beside it)") from None
        if not os.access(shard, os.R_OK):  # HDF5 would read fill values, or a same-named file elsewhere
            raise CnnCodesError(f"{path}: the shard {shard} it names cannot be read (permissions); let this user read "
                                f"the {shards_folder(path).name} folder")
        if rel not in recorded:
            continue
        size, mtime, shard_id = recorded[rel]
        if size != st.st_size:
            # its rows may no longer be those the index maps (HDF5 would pad or cut them silently)
            raise CnnCodesError(f"{path}: the shard {shard} was rewritten after this index; rerun the "
                                f"same `cnncodes extract` to index it again")
        if shard_id and mtime != st.st_mtime_ns and _shard_id(Path(shard)) != shard_id:
            raise CnnCodesError(f"{path}: the shard {shard} is not the one this index was written with (another file "
                                f"of the same size); rerun the same `cnncodes extract` to redo it and index it again")
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
