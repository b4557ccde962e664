"""The HDF5 feature store of CNN codes: output shards and the index over them (`sharded`), or one
ordinary file (`cnncodes pack`, and caches written before every input was sharded).

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
    read_computed,
    read_table,
)
from .shards import ShardUnreadable, read_shard, write_shard

__all__ = [
    "FORMAT", "FORMAT_VERSION", "HDF5_SIGNATURE", "ROW_CHUNK", "STR", "Cache", "CacheConfig", "ShardUnreadable",
    "SplitRows", "image_runs", "read_computed", "read_shard", "read_table", "write_shard",
]
