"""The cache's format: its constants, the config that decides what a code is, rows of one split,
and the small tables (file records, skipped files) stored beside the rows."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import h5py
import numpy as np

FORMAT = "cnncodes-cache"
FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")
ROW_CHUNK = 1024  # rows per HDF5 chunk: ~2-8 MB for D = 512..2048
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


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


def write_table(parent: h5py.Group, name: str, records: list[tuple], columns: tuple[str, ...]) -> None:
    """Store `records` column by column in the group `parent/name` (strings as UTF-8)."""
    g = parent.create_group(name)
    cols = list(zip(*records)) if records else [[] for _ in columns]
    for col, values in zip(columns, cols):
        if col in ("paths", "reasons"):
            g.create_dataset(col, data=np.array(list(values), dtype=object), dtype=STR)
        else:
            g.create_dataset(col, data=np.array(values, dtype=np.int64))


def image_runs(paths) -> tuple[np.ndarray, np.ndarray]:
    """The (start, stop) rows of each image: an image's rows (its views) are contiguous, in a
    cache and in a shard alike."""
    paths = np.asarray(paths, dtype=object)
    if not len(paths):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, paths[1:] != paths[:-1]])
    return starts, np.r_[starts[1:], len(paths)]


def read_table(parent: h5py.Group, name: str) -> list[tuple]:
    """The records `write_table` stored ("files": (path, size, mtime_ns); "skipped": (path, reason))."""
    g = parent.get(name)
    if g is None:
        return []
    cols = [g[c].asstr()[()] if g[c].dtype.kind in "OS" else g[c][()] for c in g.keys()]
    order = list(g.keys())
    table = dict(zip(order, cols))
    if name == "files":
        return [(p, int(s), int(m)) for p, s, m in zip(table["paths"], table["size"], table["mtime_ns"])]
    return list(zip(table["paths"], table["reasons"]))
