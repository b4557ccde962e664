"""The no-op check of `extract`, without torch: would this call rewrite the store as it is?

Importing torch and torchvision costs 3-6 s of CPU on a small machine, more than a whole
rerun on an unchanged input should take. So the index records the *request* that made it
(`request_key`: the arguments that decide its configuration, a local weights file's
sha256, and the versions of the libraries that resolve names such as `DEFAULT`), and
`up_to_date` compares that and the input's shards (a stat each, a folder's walk) with the
index using h5py alone.

It answers "up to date" only when the full `extract` would: every input shard has the
signature its output shard records, in the same order, every output shard is the file the
index recorded, the labels and ignored files are the same, and no --strict asks for more.
Anything else (including an index written before it recorded shard origins) answers None
and the full path decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import h5py

from .errors import CnnCodesError
from .runtime import file_sha256
from .store import Cache, read_table

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


def up_to_date(source, out: str | Path, request: str, strict: bool = False) -> UpToDate | None:
    """The report of a no-op `extract` of `source` (a `sources.ShardSource`) if the store `out` is
    exactly what `request` would write, else None (then run the full `extract`)."""
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
        if cache.manifest != getattr(source, "manifest", None):
            return None  # another manifest file, columns or split: the full path decides
        inputs = source.shards()
        ignored = source.ignored() if hasattr(source, "ignored") else {}
        if sorted(inputs) != sorted(cache.splits) or (strict and any(ignored.values())):
            return None
        layout = getattr(source, "layout", None)
        result = UpToDate({}, [], list(layout.warnings) if layout else [])
        for split, shards in inputs.items():
            g = f[split]
            try:
                if not _split_unchanged(out.parent, g, shards, ignored.get(split, []), index_shards(g)):
                    return None
            except (KeyError, OSError, ValueError, TypeError):
                return None  # a damaged or older index: the full path decides
            result.split_counts[split] = int(g["features"].shape[0])
            result.skipped += cache.skipped(split)
        return None if strict and result.skipped else result  # --strict refuses them: the full path says which


def _split_unchanged(folder: Path, g: h5py.Group, shards: list, ignored: list, outputs: list) -> bool:
    """Every input shard signed as its output shard's origin says, every output shard the file the
    index recorded, and the same ignored inputs."""
    origins = [json.loads(o) for o in g["shards/origin"].asstr()[()]]
    if len(origins) != len(shards) or any({k: o.get(k, "") for k in s.signature()} != s.signature()
                                          for o, s in zip(origins, shards)):
        return False  # a changed, added, removed or failed input shard: the full path redoes it
    for rel, size, mtime in outputs:
        st = (folder / rel).stat()
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            return False
    counted = int(g["shards/skipped"][()].sum())
    return [tuple(s) for s in read_table(g, "skipped")[counted:]] == [tuple(s) for s in ignored]
