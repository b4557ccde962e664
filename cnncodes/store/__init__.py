"""The HDF5 feature store ("cache") of CNN codes, and the crash-safe shards it is built from.

Layout (any HDF5 tool can read it; see docs/formats.md):

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

from .cache import Cache
from .format import (
    FORMAT,
    FORMAT_VERSION,
    HDF5_SIGNATURE,
    ROW_CHUNK,
    STR,
    CacheConfig,
    SplitRows,
    image_runs,
    read_table,
)
from .merge import RowSource, SplitPlan, read_computed, write_cache
from .shards import (
    ShardUnreadable,
    last_shard_seq,
    parts_folder,
    pending_shards,
    read_shard,
    shard_path,
    shard_split,
    shard_written,
    write_shard,
)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "HDF5_SIGNATURE", "ROW_CHUNK", "STR", "Cache", "CacheConfig", "RowSource",
    "ShardUnreadable", "SplitPlan", "SplitRows", "image_runs", "last_shard_seq", "parts_folder", "pending_shards", "read_shard",
    "read_computed", "read_table", "shard_path", "shard_split", "shard_written", "write_cache", "write_shard",
]
