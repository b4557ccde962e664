"""The no-op check of `extract`, without torch: would this call rewrite the cache as it is?

Importing torch and torchvision costs 3-6 s of CPU on a small machine, more than a whole
rerun on an unchanged folder should take. So the cache records the *request* that made it
(`request_key`: the arguments that decide its configuration, a local weights file's
sha256, and the versions of the libraries that resolve names such as `DEFAULT`), and
`up_to_date` compares that and a rescan of the folder with the cache using h5py alone.

It answers "up to date" only when the full `extract` would: every file has the size and
mtime recorded, in the same order, with the same labels and skipped reasons, no unfinished
shards exist and no --strict/--overwrite asks for more. Anything else (including a cache
written before requests were recorded) answers None and the full path decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np

from .folders import FolderLayout, ImageFile, discover
from .errors import CnnCodesError
from .manifest import ManifestOptions
from .runtime import file_sha256
from .store import Cache, image_runs, parts_folder, read_table

REQUEST_ATTR = "request"
_VERSIONED = ("cnncodes", "torch", "torchvision", "timm")
# How a weights file's default preprocessing is chosen (backbones.resolve_preprocessing): in the key of
# file caches, so a cache made under the earlier rule (DEFAULT's transforms) is not taken as up to date.
FILE_PREPROCESSING_RULE = "published-by-sha256-else-original"


@dataclass
class UpToDate:
    """What a no-op `extract` reports: codes per split, skipped files, folder warnings."""

    split_counts: dict[str, int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def request_key(*, arch: str, weights: str | None, weights_sha256: str, image_size: int | None, precision: str,
                views: int, eval_views: int, seed: int, layers: str | None = None,
                preprocess_like: str | None = None, decode: str = "cpu") -> str:
    """The JSON the cache records: equal keys give equal cache configurations. `decode` ("cpu", "gpu"
    or "auto") enters the key only when not "cpu", so keys recorded before it existed still match."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = ""
    return json.dumps({"arch": arch, "weights": weights, "weights_sha256": weights_sha256, "image_size": image_size,
                       "precision": precision, "views": views, "eval_views": eval_views, "seed": seed,
                       "layers": layers, "preprocess_like": preprocess_like, "versions": versions,
                       **({"decode": decode} if decode != "cpu" else {}),
                       **({"file_preprocessing": FILE_PREPROCESSING_RULE} if weights_sha256 else {})}, sort_keys=True)


def weights_sha256(weights: str | None) -> str:
    """The content hash of a local weights file ('' for a torchvision name or 'none'), as
    `backbones.resolve_weights` records it: a file replaced in place changes the key."""
    if not weights or not Path(weights).is_file():
        return ""
    try:
        return file_sha256(weights)
    except OSError:
        return ""  # unreadable: the full path reports it


def up_to_date(data: str | Path, out: str | Path, request: str, strict: bool = False,
               manifest: ManifestOptions | None = None) -> UpToDate | None:
    """The report of a no-op `extract` if the cache `out` is exactly what `request` on
    `data` (a folder, or a CSV manifest read with `manifest` options) would write, else
    None (then run the full `extract`)."""
    out = Path(out)
    if not out.is_file() or parts_folder(out).exists():
        return None
    try:
        cache = Cache(out)  # validated as every reader validates it: damage is the full path's to report
    except CnnCodesError:
        return None
    with cache:
        f = cache.file
        if f.attrs.get(REQUEST_ATTR) != request:
            return None
        layout = discover(data, manifest)
        if cache.manifest != layout.manifest:
            return None  # another manifest file, columns or split: the full path decides
        if strict and any(layout.ignored.values()):
            return None  # --strict refuses ignored files: the full path says which
        try:
            return _compare(f, layout)
        except (KeyError, OSError, ValueError, TypeError):
            return None  # a damaged cache: the full path names the damage and the fix


def _compare(f: h5py.File, layout: FolderLayout) -> UpToDate | None:
    try:
        classes = json.loads(f.attrs["classes"])
    except (KeyError, TypeError, ValueError):
        return None
    splits = sorted(k for k in f.keys() if isinstance(f[k], h5py.Group))
    if classes != layout.classes or splits != sorted(layout.splits):
        return None
    result = UpToDate({}, [], list(layout.warnings))
    for split, files in layout.splits.items():
        skipped = _split_skipped(f[split], files, layout.ignored.get(split, []))
        if skipped is None:
            return None
        result.split_counts[split] = int(f[split]["features"].shape[0])
        result.skipped += skipped
    return result


def _split_skipped(g: h5py.Group, files: list[ImageFile], ignored: list[tuple[str, str]]) -> list[tuple[str, str]] | None:
    """The split's skipped list if its rows, labels and records match `files`, else None."""
    if read_table(g, "files") != [(f.path, f.size, f.mtime_ns) for f in files]:
        return None
    paths = np.asarray(g["paths"].asstr()[()], dtype=object)
    starts, stops = image_runs(paths)
    row_files = list(paths[starts])
    with_rows = set(row_files)
    if row_files != [f.path for f in files if f.path in with_rows]:
        return None  # rows out of the folder's order, or rows of files no longer there
    labels = np.repeat([f.label for f in files if f.path in with_rows], stops - starts)
    if not np.array_equal(g["labels"][()], labels):
        return None
    old = read_table(g, "skipped")
    reasons = dict(old)
    expected = [(f.path, reasons.get(f.path, "skipped")) for f in files if f.path not in with_rows] + list(ignored)
    return expected if [tuple(s) for s in old] == [tuple(s) for s in expected] else None


def shards_up_to_date(source, out: str | Path, request: str, strict: bool = False) -> UpToDate | None:
    """The report of a no-op `extract` from WebDataset shards (a `webdata.ShardSource`): the index
    `out` records this request and labels, every input shard has the size and mtime it records
    (stat only: no shard is opened) and every output shard it names is the one it indexed."""
    from .store.sharded import index_shards, is_index

    out = Path(out)
    if not out.is_file():
        return None
    try:
        cache = Cache(out)  # checks that every output shard it names exists
    except CnnCodesError:
        return None
    with cache:
        f = cache.file
        if not is_index(f) or f.attrs.get(REQUEST_ATTR) != request:
            return None
        if f.attrs.get("source") != json.dumps(source.identity(), sort_keys=True):
            return None
        inputs = source.shards()
        if sorted(inputs) != sorted(cache.splits):
            return None
        result = UpToDate({})
        for split, shards in inputs.items():
            g = f[split]
            if read_table(g, "files") != [(s.path, s.size, s.mtime_ns) for s in shards]:
                return None  # a changed, added, removed or failed input shard: the full path redoes it
            for rel, size, mtime in index_shards(g):
                try:
                    st = (out.parent / rel).stat()
                except OSError:
                    return None
                if (st.st_size, st.st_mtime_ns) != (size, mtime):
                    return None
            result.split_counts[split] = int(g["features"].shape[0])
            result.skipped += cache.skipped(split)
        return None if strict and result.skipped else result  # --strict refuses them: the full path says which
