"""Writing a cache: rows copied from their sources (an old cache's splits, shards) in final
order into a new file that replaces the old one whole."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np

from ..errors import CnnCodesError
from ..runtime import atomic_path
from .format import FORMAT, FORMAT_VERSION, ROW_CHUNK, STR, CacheConfig, describe_split, write_classes, write_table
from .shards import read_shard


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
    computed: dict | None = None,
) -> None:
    """Write the whole cache atomically, copying rows from their sources in final order.

    `request` is `uptodate.request_key` of the call that wrote it (its torch-free no-op check)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        write_root_attrs(f, config, classes, feature_dim, versions, request, manifest, computed)
        for split, plan in splits.items():
            _write_split(f.create_group(split), plan, feature_dim)


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
    describe_split(g)
    write_table(g, "files", plan.files, ("paths", "size", "mtime_ns"))
    write_table(g, "skipped", plan.skipped, ("paths", "reasons"))


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
