"""A folder or a CSV manifest as shards: each split's files cut into runs of about `shard_size`.

The cut points are chosen so that the common edits stay local. A run ends where the parent
folder changes (a class folder, for ImageFolder layouts) and after every file whose path hashes
to 0 modulo `shard_size` (content-defined chunking, as rsync and restic cut files): a cut depends
on that one file's name, not on its position, so adding or removing a few images in a class
changes only the runs they fall in, and every other shard keeps its name and its signature
(its members' paths, sizes and mtimes). A run longer than `MAX_RUN` x `shard_size` is cut by
count, which bounds a shard at the price of locality inside that run only.

Why about 1,000 images: a killed run loses at most one shard per process (~3 s of a CPU's work,
well under a second of a GPU's), a rerun's plan stays a stat per file plus one digest per shard,
and 10^8 images make 10^5 shards, an index HDF5 opens in seconds. Each shard is batched from its
own start, so a shard's codes never depend on another shard's files.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..folders import JPEG_SUFFIXES, FolderLayout, ImageFile
from .base import InputShard, Item

SHARD_SIZE = 1000  # images per folder/CSV shard, on average (the `--shard-size` default)
MAX_RUN = 4  # a run is cut by count after MAX_RUN x shard_size files without a hash cut
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def cut(files: list[ImageFile], shard_size: int) -> list[list[ImageFile]]:
    """The files in runs: a new run where the parent folder changes, after a file whose path hashes
    to 0 mod `shard_size`, and after MAX_RUN x `shard_size` files of one run."""
    runs: list[list[ImageFile]] = []
    run: list[ImageFile] = []
    for f in files:
        if run and f.path.rpartition("/")[0] != run[-1].path.rpartition("/")[0]:
            runs.append(run)
            run = []
        run.append(f)
        if _hash(f.path) % shard_size == 0 or len(run) >= MAX_RUN * shard_size:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return runs


def shard_of(root: Path, run: list[ImageFile]) -> InputShard:
    """A run of files as an input shard: named after its folder and its first file (images added
    to a class usually sort last, so the name, and the output shard, survive them), signed by its
    members."""
    first = run[0].path
    folder = _UNSAFE.sub("_", first.rpartition("/")[0])[-40:] or "root"
    # the labels too: a CSV row relabelled (same classes) changes its shard's rows, not its files
    digest = hashlib.blake2b(repr([(f.path, f.size, f.mtime_ns, f.label) for f in run]).encode(),
                             digest_size=16).hexdigest()
    return InputShard(path=str(root / run[0].path), size=sum(f.size for f in run),
                      mtime_ns=max(f.mtime_ns for f in run), name=f"{folder}-{_hash(first):016x}",
                      digest=digest, members=tuple(run))


@dataclass
class FolderSource:
    """A `FolderLayout` (a folder or a CSV manifest, see `folders.discover`) as a `ShardSource`.
    Its ignored files (not images, unreadable, a manifest row without a file) are reported by
    `ignored()`, never read."""

    layout: FolderLayout
    shard_size: int = SHARD_SIZE

    def shards(self) -> dict[str, list[InputShard]]:
        root = self.layout.root
        return {split: [shard_of(root, run) for run in cut(files, self.shard_size)]
                for split, files in self.layout.splits.items()}

    def items(self, shard: InputShard) -> Iterator[Item]:
        """Each member as an item to read from disk (the reader thread pool reads it)."""
        root = self.layout.root
        for f in shard.members:
            yield Item(key=f.path, label=f.label, ext=Path(f.path).suffix.lower().lstrip("."), path=str(root / f.path))

    def classes(self) -> list[str]:
        return self.layout.classes

    def identity(self) -> dict:
        """What decides the labels: the class list (a class added renumbers them: shards are redone)."""
        return {"input": "manifest" if self.layout.manifest else "folder", "classes": self.layout.classes}

    @property
    def manifest(self) -> dict | None:
        """A CSV manifest's record (its path, sha256, columns, splits), kept in the index."""
        return self.layout.manifest

    def ignored(self) -> dict[str, list[tuple[str, str]]]:
        return {split: list(self.layout.ignored.get(split, [])) for split in self.layout.splits}


def is_jpeg(item: Item) -> bool:
    return f".{item.ext}" in JPEG_SUFFIXES
