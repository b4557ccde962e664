"""The cache's format: its constants, the config that decides what a code is, rows of one split,
and the small tables (file records, skipped files) stored beside the rows."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

FORMAT = "cnncodes-cache"
FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")
ROW_CHUNK = 1024  # rows per HDF5 chunk: ~2-8 MB for D = 512..2048
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
CLASSES = "classes"  # root dataset of the class names (also the JSON root attribute of the same name)
# What each dataset of a split is, written on it as attributes (`description`, `axes`) so a reader
# with h5py, h5dump or xarray alone needs no documentation; docs/formats.md has the same table.
SPLIT_DATASETS = {
    "features": ("CNN codes (float32), one row per (image, view); rows with views == 0 are the plain eval view "
                 "(resize + center crop), the others augmented views of the same image", "row, feature"),
    "labels": ("class of each row (int64): an index into /classes", "row"),
    "views": ("view of each row: 0 = the plain eval view, 1..K = augmented views (--views/--eval-views)", "row"),
    "paths": ("image file of each row, relative to the data folder (or as the manifest writes it); "
              "an image's rows are contiguous", "row"),
}


def describe_split(g: h5py.Group) -> None:
    """Write `SPLIT_DATASETS`' description and axes on the datasets of split group `g`."""
    for name, (description, axes) in SPLIT_DATASETS.items():
        if name in g:
            g[name].attrs["description"] = description
            g[name].attrs["axes"] = axes


def write_classes(f: h5py.File, classes: list[str]) -> None:
    """The class names as a string dataset `/classes` (index = label), readable without JSON."""
    d = f.create_dataset(CLASSES, data=np.array(classes, dtype=object), dtype=STR)
    d.attrs["description"] = "class names; a row's label is an index into this list"
    d.attrs["axes"] = "class"


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
    decode: str = "cpu:pil"  # the JPEG decoder, "<device>:<library>-<version>"; older caches: PIL on the CPU

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CacheConfig":
        return cls(**json.loads(text))

    def differences(self, other: "CacheConfig") -> list[str]:
        a, b = asdict(self), asdict(other)
        a["decode"], b["decode"] = decoder_family(self.decode), decoder_family(other.decode)  # a version bump is no change
        return [f"{k}: cache has {b[k]!r}, asked for {a[k]!r}" for k in a if k != "weights_name" and a[k] != b[k]]

    def views_for(self, split: str) -> int:
        return self.views if split == "train" else self.eval_views


def decoder_family(decode: str) -> str:
    """The decoder without its version: "cuda:nvjpeg-torchvision-0.29.1" -> "cuda:nvjpeg-torchvision"."""
    return decode.rsplit("-", 1)[0] if "-" in decode else decode


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


def write_root_attrs(f: h5py.File, config: CacheConfig, classes: list[str], feature_dim: int,
                     versions: dict[str, str], request: str = "", manifest: dict | None = None,
                     computed: dict | None = None) -> None:
    """The root attributes every cache has (a merged cache and a sharded store's index alike),
    and the class names as the dataset /classes. `computed`: how the codes were computed beyond
    the config (BatchNorm folding, memory layout), recorded as the JSON attribute `computed_with`."""
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["config"] = config.to_json()
    for key in ("arch", "weights", "weights_name", "precision", "views", "eval_views", "seed"):
        f.attrs[key] = getattr(config, key)
    f.attrs["preprocessing"] = json.dumps(config.preprocessing)
    f.attrs["classes"] = json.dumps(classes)
    write_classes(f, classes)
    f.attrs["feature_dim"] = feature_dim
    f.attrs["request"] = request
    if manifest is not None:
        f.attrs["manifest"] = json.dumps(manifest, sort_keys=True)
    for name, version in versions.items():
        f.attrs[f"{name}_version"] = str(version)
    if computed:
        f.attrs["computed_with"] = json.dumps(computed, sort_keys=True)


def read_computed(path: Path) -> dict:
    """`computed_with` of an existing cache or index ({} when absent or unreadable): carried over
    by a run that writes the cache without running the network (a merge of finished shards)."""
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs.get("computed_with", "{}"))
    except (OSError, ValueError):
        return {}
