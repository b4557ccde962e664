"""Reading a cache: `Cache` validates the file on open and reads splits lazily."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ..errors import CnnCodesError
from .format import FORMAT, FORMAT_VERSION, CacheConfig, read_table
from .sharded import check_sources, is_index, shards_folder


class Cache:
    """Read access to a cache file, validated on open; a context manager."""

    def __init__(self, path: str | Path, sources: bool = True):
        """`sources` False: a sharded index's attributes and splits are checked, not its shards
        (`extract` rebuilds an index whose shards changed)."""
        self.path = Path(path)
        self.file = _open_h5(self.path)
        try:
            self._validate(sources)
        except BaseException:
            self.file.close()
            raise

    def _validate(self, sources: bool = True) -> None:
        a = self.file.attrs
        if a.get("format") != FORMAT:
            raise CnnCodesError(f"{self.path}: HDF5 file but not a cnncodes cache (no format={FORMAT} attribute); create one with `cnncodes extract`")
        if a.get("format_version") != FORMAT_VERSION:
            raise CnnCodesError(f"{self.path}: cache format version {a.get('format_version')} is not supported (this "
                                f"cnncodes reads {FORMAT_VERSION}); extract it again with this version (--overwrite)")
        try:
            self.config = CacheConfig.from_json(a["config"])
            self.classes: list[str] = json.loads(a["classes"])
            self.feature_dim = int(a["feature_dim"])
        except (KeyError, TypeError, ValueError) as e:
            raise CnnCodesError(f"{self.path}: cache attributes are damaged ({e}); re-run `cnncodes extract --overwrite`") from e
        if sources and is_index(self.file):
            check_sources(self.path, self.file)  # else a missing shard would read as fill values
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
        """Class indices into `classes`, checked in range (checked here, not on open: they are read anyway)."""
        y = self.require_split(split)["labels"][()].astype(np.int64)
        bad = y[(y < 0) | (y >= len(self.classes))]
        if bad.size:
            raise CnnCodesError(f"{self.path}: {split}/labels holds class index {bad[0]} but the cache has "
                                f"{len(self.classes)} classes; the cache is damaged: re-run `cnncodes extract --overwrite`")
        return y

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
        """The inputs processed for `split`: path -> (size, mtime_ns). A sharded store lists its input
        shards (a tar or Parquet file; a folder shard by its first file: each output shard's own
        `files` table lists all its files); a one-file cache from an earlier cnncodes, every file."""
        return {p: (s, m) for p, s, m in read_table(self.require_split(split), "files")}

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
            "decode": self.config.decode,
            "computed_with": json.loads(a.get("computed_with", "{}")),  # BatchNorm folding, memory layout
            "feature_dim": self.feature_dim,
            "classes": self.classes,
            "preprocessing": self.config.preprocessing,
            "seed": self.config.seed,
            "splits": splits,
            "store": a.get("store", "file"),  # "sharded": an index over one output shard per input shard
            "shards": {s: len(self.file[s]["shards/paths"]) for s in self.splits if "shards" in self.file[s]},
            "manifest": self.manifest,
            "versions": {k: a.get(f"{k}_version", "?") for k in ("cnncodes", "torch", "torchvision")},
        }


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        waiting = sorted(shards_folder(path).glob("*/*.h5"))
        if waiting:
            raise CnnCodesError(f"{path}: no index yet, but {len(waiting)} output shards of an interrupted extract wait in "
                                f"{shards_folder(path)}; rerun the same `cnncodes extract` command to finish it")
        raise CnnCodesError(f"{path}: no such cache file; create it with `cnncodes extract DATA -o {path}`")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CnnCodesError(f"{path}: not a readable HDF5 file (truncated or not HDF5: {str(e).splitlines()[0]}); re-create it with `cnncodes extract`") from e
