"""The HDF5 feature store ("cache") of CNN codes, and the crash-safe shards it is built from.

Layout (any HDF5 tool can read it; see README "Cache format"):

    /                       attrs: format, format_version, arch, weights, weights_name,
                            precision, preprocessing (JSON), views, eval_views, seed,
                            classes (JSON), feature_dim, cnncodes/torch/torchvision versions,
                            manifest (JSON; only for a CSV manifest: its path, sha256, columns, splits)
    /<split>/features       float32 (N, D), chunked
    /<split>/labels         int64 (N,)   index into `classes`
    /<split>/paths          str (N,)     image path relative to the data root (a manifest's: as written)
    /<split>/views          int16 (N,)   0 = the plain eval view, k >= 1 = augmented view k
    /<split>/files/{paths,size,mtime_ns}   every file processed, for incremental reruns
    /<split>/skipped/{paths,reasons}       files that could not be used, and why

Rows are ordered by image (the folder's sorted order) then view, so a resumed, an
incremental and an uninterrupted run all give the same file. The cache is only ever
replaced whole (write to a temporary file, fsync, rename): it is never half-written.
Work in progress lives in `<cache>.parts/` as small HDF5 shards, each written atomically.
"""

from __future__ import annotations

import errno
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np

from .errors import CnnCodesError
from .runtime import atomic_path

FORMAT = "cnncodes-cache"
FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")
ROW_CHUNK = 1024  # rows per HDF5 chunk: ~2-8 MB for D = 512..2048
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def parts_folder(cache: str | Path) -> Path:
    """Where the shards of an unfinished extract into `cache` live."""
    cache = Path(cache)
    return cache.with_name(cache.name + ".parts")


@dataclass(frozen=True)
class CacheConfig:
    """Everything that decides what a code is: two caches with equal configs can be merged."""

    arch: str
    weights: str  # identity: torchvision enum, file sha256, or none
    weights_name: str
    precision: str
    preprocessing: dict
    views: int = 0
    eval_views: int = 0
    seed: int = 0
    layers: str = ""  # "" = the classifier's input; else pooled intermediate layers "NAME,NAME"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CacheConfig":
        return cls(**json.loads(text))

    def differences(self, other: "CacheConfig") -> list[str]:
        a, b = asdict(self), asdict(other)
        return [f"{k}: cache has {b[k]!r}, asked for {a[k]!r}" for k in a if k != "weights_name" and a[k] != b[k]]

    def views_for(self, split: str) -> int:
        return self.views if split == "train" else self.eval_views


@dataclass
class SplitRows:
    """In-memory rows of one split (for shards): features plus row tags and file records."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    views: np.ndarray
    files: list[tuple[str, int, int]] = field(default_factory=list)  # (path, size, mtime_ns)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


# --------------------------------------------------------------------------- reading


class Cache:
    """Read access to a cache file, validated on open; a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = _open_h5(self.path)
        try:
            self._validate()
        except BaseException:
            self.file.close()
            raise

    def _validate(self) -> None:
        a = self.file.attrs
        if a.get("format") != FORMAT:
            raise CnnCodesError(f"{self.path}: HDF5 file but not a cnncodes cache (no format={FORMAT} attribute); create one with `cnncodes extract`")
        try:
            self.config = CacheConfig.from_json(a["config"])
            self.classes: list[str] = json.loads(a["classes"])
            self.feature_dim = int(a["feature_dim"])
        except (KeyError, TypeError, ValueError) as e:
            raise CnnCodesError(f"{self.path}: cache attributes are damaged ({e}); re-run `cnncodes extract --overwrite`") from e
        for split in self.splits:
            self._validate_split(split)

    def _validate_split(self, split: str) -> None:
        g = self.file[split]
        for name in ("features", "labels", "paths", "views"):
            if name not in g or not isinstance(g[name], h5py.Dataset):
                raise CnnCodesError(f"{self.path}: split '{split}' has no '{name}' dataset; the cache is damaged: re-run `cnncodes extract --overwrite`")
        n = g["features"].shape[0]
        if g["features"].ndim != 2 or g["features"].shape[1] != self.feature_dim:
            raise CnnCodesError(f"{self.path}: {split}/features has shape {g['features'].shape}, expected (N, {self.feature_dim}); re-run `cnncodes extract --overwrite`")
        for name in ("labels", "paths", "views"):
            if g[name].shape != (n,):
                raise CnnCodesError(f"{self.path}: {split}/{name} has shape {g[name].shape}, expected ({n},); re-run `cnncodes extract --overwrite`")

    @property
    def splits(self) -> list[str]:
        return [k for k in self.file.keys() if isinstance(self.file[k], h5py.Group)]

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def require_split(self, split: str) -> h5py.Group:
        if split not in self.file:
            have = ", ".join(self.splits) or "none"
            raise CnnCodesError(f"{self.path}: no '{split}' split (splits: {have})")
        return self.file[split]

    def features(self, split: str) -> h5py.Dataset:
        """The (N, D) features dataset, read lazily (slice it to load)."""
        return self.require_split(split)["features"]

    def labels(self, split: str) -> np.ndarray:
        return self.require_split(split)["labels"][()].astype(np.int64)

    def paths(self, split: str) -> np.ndarray:
        return np.array(self.require_split(split)["paths"].asstr()[()], dtype=object)

    def views(self, split: str) -> np.ndarray:
        return self.require_split(split)["views"][()].astype(np.int64)

    def groups(self, split: str) -> np.ndarray:
        """An integer per row naming its source image: all views of one image share it."""
        _, inverse = np.unique(self.paths(split), return_inverse=True)
        return inverse.astype(np.int64)

    def skipped(self, split: str) -> list[tuple[str, str]]:
        g = self.require_split(split).get("skipped")
        if g is None or "paths" not in g:
            return []
        return list(zip(g["paths"].asstr()[()], g["reasons"].asstr()[()]))

    def files(self, split: str) -> dict[str, tuple[int, int]]:
        g = self.require_split(split).get("files")
        if g is None:
            return {}
        return {p: (int(s), int(m)) for p, s, m in zip(g["paths"].asstr()[()], g["size"][()], g["mtime_ns"][()])}

    @property
    def manifest(self) -> dict | None:
        """What the cache records of the CSV manifest it was extracted from (None: a folder)."""
        text = self.file.attrs.get("manifest")
        return json.loads(text) if text is not None else None

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of a split in memory (float32, int64)."""
        return self.features(split)[()].astype(np.float32, copy=False), self.labels(split)

    def info(self) -> dict:
        """A summary for `cnncodes info` (JSON-friendly)."""
        splits = {}
        for s in self.splits:
            views = self.views(s)
            splits[s] = {
                "images": int((views == 0).sum()),
                "codes": int(len(views)),
                "views_per_image": self.config.views_for(s),
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped(s)],
            }
        a = self.file.attrs
        return {
            "path": str(self.path),
            "arch": self.config.arch,
            "weights": self.config.weights_name,
            "weights_identity": self.config.weights,
            "precision": self.config.precision,
            "feature_dim": self.feature_dim,
            "classes": self.classes,
            "preprocessing": self.config.preprocessing,
            "seed": self.config.seed,
            "splits": splits,
            "pending": pending_shards(self.path),
            "manifest": self.manifest,
            "versions": {k: a.get(f"{k}_version", "?") for k in ("cnncodes", "torch", "torchvision")},
        }


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        waiting = pending_shards(path)
        if waiting:
            raise CnnCodesError(f"{path}: no cache file yet, but {waiting['shards']} shards ({waiting['images']} images) of an "
                                f"interrupted extract wait in {waiting['folder']}; rerun the same `cnncodes extract` command to finish it")
        raise CnnCodesError(f"{path}: no such cache file; create it with `cnncodes extract DATA -o {path}`")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CnnCodesError(f"{path}: not a readable HDF5 file (truncated or not HDF5: {str(e).splitlines()[0]}); re-create it with `cnncodes extract`") from e


# --------------------------------------------------------------------------- writing


def write_shard(path: Path, rows: SplitRows) -> None:
    """Write one shard atomically (a small HDF5 file with the same row datasets)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        _write_rows(f, rows)


def read_shard(path: Path) -> h5py.File | None:
    """Open a shard; None only when it is proven torn (not HDF5, truncated, wrong structure).

    Shards hold finished work, so anything else that stops the read (too many open files,
    permissions, I/O errors) raises a CnnCodesError naming the file and the fix: a torn shard
    may be deleted and redone, an unreadable one never.
    """
    try:
        with open(path, "rb") as f:
            if f.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
                return None
        shard = h5py.File(path, "r")
    except OSError as e:
        if e.errno is None:  # HDF5's own verdict on the bytes (no OS error behind it): torn
            return None
        raise ShardUnreadable(path, e) from None
    try:
        n = shard["features"].shape[0]
        if not all(shard[k].shape == (n,) for k in ("labels", "paths", "views")):
            raise KeyError("shape")
        return shard
    except KeyError:
        shard.close()
        return None
    except BaseException as e:
        shard.close()
        if isinstance(e, OSError) and e.errno is not None:
            raise ShardUnreadable(path, e) from None
        raise


class ShardUnreadable(CnnCodesError):
    """A shard that exists but cannot be read now: the run stops and every shard is kept."""

    FIXES = {
        errno.EMFILE: "raise the open-files limit (ulimit -n) and rerun the same command",
        errno.ENFILE: "the system's open-file table is full: close other programs and rerun the same command",
        errno.EACCES: "make the file readable (chmod/chown) and rerun the same command",
        errno.EPERM: "make the file readable (chmod/chown) and rerun the same command",
        errno.ENOSPC: "free disk space and rerun the same command",
        errno.ENOMEM: "free memory and rerun the same command",
    }

    def __init__(self, path: Path, e: OSError):
        fix = self.FIXES.get(e.errno, "fix the cause and rerun the same command")
        reason = e.strerror or str(e).splitlines()[0]
        super().__init__(f"{path}: cannot read this shard of finished work ({reason}); every shard is kept: {fix}")


def pending_shards(cache: str | Path) -> dict | None:
    """The unfinished work waiting beside `cache` (shards, images, torn shards), or None."""
    folder = parts_folder(cache)
    shards = sorted(folder.glob("*.h5")) if folder.is_dir() else []
    if not shards:
        return None
    images = torn = 0
    for path in shards:  # one open at a time
        shard = read_shard(path)
        if shard is None:
            torn += 1
            continue
        with shard:
            images += shard["files/paths"].shape[0] if "files/paths" in shard else 0
    return {"folder": str(folder), "shards": len(shards), "images": images, "torn": torn}


def _write_rows(f: h5py.Group, rows: SplitRows) -> None:
    f.create_dataset("features", data=rows.features.astype(np.float32, copy=False))
    f.create_dataset("labels", data=np.asarray(rows.labels, dtype=np.int64))
    f.create_dataset("paths", data=np.array(rows.paths, dtype=object), dtype=STR)
    f.create_dataset("views", data=np.asarray(rows.views, dtype=np.int16))
    _write_table(f, "files", rows.files, ("paths", "size", "mtime_ns"))
    _write_table(f, "skipped", rows.skipped, ("paths", "reasons"))


def _write_table(parent: h5py.Group, name: str, records: list[tuple], columns: tuple[str, ...]) -> None:
    g = parent.create_group(name)
    cols = list(zip(*records)) if records else [[] for _ in columns]
    for col, values in zip(columns, cols):
        if col in ("paths", "reasons"):
            g.create_dataset(col, data=np.array(list(values), dtype=object), dtype=STR)
        else:
            g.create_dataset(col, data=np.array(values, dtype=np.int64))


def read_table(parent: h5py.Group, name: str) -> list[tuple]:
    g = parent.get(name)
    if g is None:
        return []
    cols = [g[c].asstr()[()] if g[c].dtype.kind in "OS" else g[c][()] for c in g.keys()]
    order = list(g.keys())
    table = dict(zip(order, cols))
    if name == "files":
        return [(p, int(s), int(m)) for p, s, m in zip(table["paths"], table["size"], table["mtime_ns"])]
    return list(zip(table["paths"], table["reasons"]))


@dataclass
class RowSource:
    """A contiguous run of rows in an open HDF5 group (an old cache split) or a shard file.

    Shards are named by path and opened only while their rows are copied (`_OneShardOpen`),
    so merging any number of shards needs a handful of open files.
    """

    group: h5py.Group | Path
    start: int
    stop: int


class _OneShardOpen:
    """Gives the HDF5 group of a row source, keeping at most one shard file open."""

    def __init__(self):
        self.path: Path | None = None
        self.file: h5py.File | None = None

    def group(self, source: h5py.Group | Path) -> h5py.Group:
        if not isinstance(source, Path):
            return source
        if source != self.path:
            self.close()
            self.file = read_shard(source)
            if self.file is None:
                raise CnnCodesError(f"{source}: this shard was readable a moment ago and is now damaged; "
                                    f"rerun the same command (its images are redone)")
            self.path = source
        return self.file

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.path = self.file = None


def write_cache(
    path: Path,
    config: CacheConfig,
    classes: list[str],
    feature_dim: int,
    splits: dict[str, "SplitPlan"],
    versions: dict[str, str],
    request: str = "",
    manifest: dict | None = None,
) -> None:
    """Write the whole cache atomically, copying rows from their sources in final order.

    `request` is `uptodate.request_key` of the call that wrote it (its torch-free no-op check)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["config"] = config.to_json()
        for key in ("arch", "weights", "weights_name", "precision", "views", "eval_views", "seed"):
            f.attrs[key] = getattr(config, key)
        f.attrs["preprocessing"] = json.dumps(config.preprocessing)
        f.attrs["classes"] = json.dumps(classes)
        f.attrs["feature_dim"] = feature_dim
        f.attrs["request"] = request
        if manifest is not None:
            f.attrs["manifest"] = json.dumps(manifest, sort_keys=True)
        for name, version in versions.items():
            f.attrs[f"{name}_version"] = str(version)
        for split, plan in splits.items():
            _write_split(f.create_group(split), plan, feature_dim)


@dataclass
class SplitPlan:
    """The final content of one split: row runs in order, their labels, and file records."""

    runs: list[RowSource]
    labels: np.ndarray  # final labels per row (remapped to the current class list)
    files: list[tuple[str, int, int]]
    skipped: list[tuple[str, str]]

    @property
    def rows(self) -> int:
        return sum(r.stop - r.start for r in self.runs)


def _write_split(g: h5py.Group, plan: SplitPlan, dim: int) -> None:
    n = plan.rows
    feats = g.create_dataset("features", shape=(n, dim), dtype=np.float32,
                             chunks=(min(ROW_CHUNK, max(n, 1)), dim) if n else None, maxshape=(None, dim))
    paths, views = [], []
    at = 0
    sources = _OneShardOpen()
    try:
        for run in _coalesce(plan.runs):
            src = sources.group(run.group)
            for lo in range(run.start, run.stop, 65536):
                hi = min(run.stop, lo + 65536)
                feats[at:at + hi - lo] = src["features"][lo:hi]
                at += hi - lo
            paths.extend(src["paths"].asstr()[run.start:run.stop])
            views.append(src["views"][run.start:run.stop])
    finally:
        sources.close()
    g.create_dataset("labels", data=plan.labels.astype(np.int64))
    g.create_dataset("paths", data=np.array(paths, dtype=object), dtype=STR)
    g.create_dataset("views", data=np.concatenate(views).astype(np.int16) if views else np.zeros(0, np.int16))
    _write_table(g, "files", plan.files, ("paths", "size", "mtime_ns"))
    _write_table(g, "skipped", plan.skipped, ("paths", "reasons"))


def _coalesce(runs: Iterable[RowSource]) -> Iterator[RowSource]:
    """Merge adjacent runs from the same source so copies happen in large blocks."""
    current: RowSource | None = None
    for r in runs:
        if current is not None and r.group == current.group and r.start == current.stop:
            current = RowSource(current.group, current.start, r.stop)
            continue
        if current is not None:
            yield current
        current = r
    if current is not None:
        yield current
