"""The one interface every input implements: a list of shards per split, each read as items.

An input (a folder or CSV manifest, WebDataset tars, Hugging Face Parquet files) is a
`ShardSource`: `shards()` lists each split's `InputShard`s without reading them (a stat or a
directory walk), and `items(shard)` reads one shard as `Item`s in a fixed order. `extract` turns
each input shard into one atomic output shard (`store.sharded`), so everything downstream
(the plan, the torchrun queue, resume, the index) is the same whatever the input.

Torch-free: the no-op check of `extract` plans a rerun without importing torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class InputShard:
    """One unit of work: what its output shard is named after and what makes that output valid.

    `path` names it in messages (a tar or Parquet file; a folder shard's first file);
    `name` is its output shard's file stem, unique within its split and stable across runs;
    `size`, `mtime_ns` and `digest` are its signature: an output shard whose recorded signature
    differs is redone ("changed"). A file input leaves `digest` empty; a folder shard's `digest`
    hashes its members' paths, sizes, mtimes and labels, and `members` lists them (path relative to the
    source's root, label, size, mtime_ns)."""

    path: str
    size: int
    mtime_ns: int
    name: str
    digest: str = ""
    members: tuple = field(default=(), compare=False, repr=False)

    def signature(self) -> dict:
        """What an output shard records of its input (its `source*` attributes)."""
        return {"source": self.path, "source_size": self.size, "source_mtime_ns": self.mtime_ns,
                "source_digest": self.digest}


@dataclass
class Item:
    """One sample of a shard, in shard order.

    `key` names its rows in the store (`paths`): unique within the input, stable across runs
    (it also seeds the augmented views). `data` is the encoded image (None with `path`: a file to
    read, e.g. a folder's image); `ext` its format hint ("jpg", "png", ...); `label` the class
    index. `problem` set: the sample is skipped and reported with that reason."""

    key: str
    data: bytes | None = None
    label: int = -1
    ext: str = ""
    problem: str | None = None
    path: str | None = None


class ShardDamaged(Exception):
    """The shard ends early or is corrupt: the items before the damage were yielded (kept)."""


class LabelNames(ValueError):
    """String labels without a class list: a setup error for the whole run, not one bad sample."""


@runtime_checkable
class ShardSource(Protocol):
    """An input as shards. `extract` calls `shards()` once (rank 0), `items()` once per shard it
    extracts (any rank), and records `identity()` in every output shard and the index."""

    def shards(self) -> dict[str, list[InputShard]]:
        """Each split's input shards in row order, signed without being read."""

    def items(self, shard: InputShard) -> Iterator[Item]:
        """The shard's items in a fixed order. Raises OSError when the shard cannot be read at all
        (the shard fails, the run goes on), ShardDamaged after yielding what precedes a damage,
        LabelNames (or CnnCodesError) for a setup error that stops the run."""

    def classes(self) -> list[str] | None:
        """The class names (index = label), or None: labels are indices, names "0".."max"."""

    def identity(self) -> dict:
        """What, beside the images, decides the rows (e.g. where labels come from)."""


def class_index(value, classes: dict[str, int] | None) -> int:
    """A label as a class index; ValueError with the reason when it is neither an index nor a known
    name, LabelNames when it is a name and there is no class list."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"label {value!r} is neither a class index nor a class name")
    if isinstance(value, str):
        if classes is None:
            raise LabelNames(f"label '{value}' is a class name; pass --classes FILE (one name per line) to map names to indices")
        if value not in classes:
            raise ValueError(f"label '{value}' is not in the class list ({len(classes)} classes)")
        return classes[value]
    if value < 0 or (classes is not None and value >= len(classes)):
        limit = f"0..{len(classes) - 1}" if classes is not None else ">= 0"
        raise ValueError(f"label {value} is outside the class list ({limit})")
    return value
