"""Every input as a list of shards (see `base.ShardSource`): a folder or CSV manifest
(`folder`), WebDataset tars (`webdataset`), Hugging Face Parquet files (`parquet`)."""

from __future__ import annotations

import os

from .base import InputShard, Item, LabelNames, ShardDamaged, ShardSource
from .folder import SHARD_SIZE, FolderSource
from .webdataset import WebDatasetSource, is_shard_input, source_from_cli

__all__ = ["SHARD_SIZE", "FolderSource", "InputShard", "Item", "LabelNames", "ShardDamaged", "ShardSource",
           "WebDatasetSource", "as_source", "is_shard_input", "source_from_cli"]


def as_source(data: ShardSource | str | os.PathLike, manifest=None, shard_size: int = SHARD_SIZE) -> ShardSource:
    """DATA as a shard source: a source as is; WebDataset shards (a tar pattern, a shard list or a
    JSON spec) with labels from .cls; Parquet files (columns from their schema); else a folder or a
    CSV manifest read with `manifest` options."""
    if isinstance(data, ShardSource):
        return data
    if is_shard_input(data):
        return source_from_cli(str(data), None, None, "cls", None)
    from .parquet import is_parquet_input, parquet_source

    if is_parquet_input(data):
        return parquet_source(data)
    from ..folders import discover

    return FolderSource(discover(data, manifest), shard_size)
