"""Shards: small, atomically written HDF5 files of rows (the sharded store's output shards), told
apart on reading as torn (redone) or unreadable (kept, the run stops)."""

from __future__ import annotations

import errno
import io
import time
from pathlib import Path

import h5py
import numpy as np

from ..errors import CnnCodesError
from ..runtime import atomic_path
from .format import HDF5_SIGNATURE, STR, SplitRows, describe_split, write_table

WRITTEN_NS = "written_ns"  # a shard's root attribute: when it was written (ns since the epoch)


def write_shard(path: Path, rows: SplitRows, attrs: dict | None = None) -> None:
    """Write one shard atomically (a small HDF5 file with the same row datasets), with `attrs`
    (what the sharded store records of the input it came from) and its write time on its root.

    The file is built in memory and written with plain file I/O: a full disk then fails one
    `write` call cleanly, where HDF5 failing mid-flush leaves objects that crash on teardown."""
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        _write_rows(f, rows)
        f.attrs[WRITTEN_NS] = time.time_ns()
        f.attrs.update(attrs or {})
    with atomic_path(path) as tmp:
        tmp.write_bytes(image.getbuffer())


def read_shard(path: Path) -> h5py.File | None:
    """Open a shard; None only when it is proven torn (not HDF5, truncated, wrong structure).

    Shards hold finished work, so anything else that stops the read (too many open files,
    permissions, I/O errors) raises a CnnCodesError naming the file and the fix: a torn shard
    may be deleted and redone, an unreadable one never.
    """
    try:
        with open(path, "rb") as f:
            if f.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
                return None
        shard = h5py.File(path, "r")
    except OSError as e:
        if e.errno is None:  # HDF5's own verdict on the bytes (no OS error behind it): torn
            return None
        raise ShardUnreadable(path, e) from None
    try:
        n = shard["features"].shape[0]
        if not all(shard[k].shape == (n,) for k in ("labels", "paths", "views")):
            raise KeyError("shape")
        return shard
    except KeyError:
        shard.close()
        return None
    except BaseException as e:
        shard.close()
        if isinstance(e, OSError) and e.errno is not None:
            raise ShardUnreadable(path, e) from None
        raise


class ShardUnreadable(CnnCodesError):
    """A shard that exists but cannot be read now: the run stops and every shard is kept."""

    FIXES = {
        errno.EMFILE: "raise the open-files limit (ulimit -n) and rerun the same command",
        errno.ENFILE: "the system's open-file table is full: close other programs and rerun the same command",
        errno.EACCES: "make the file readable (chmod/chown) and rerun the same command",
        errno.EPERM: "make the file readable (chmod/chown) and rerun the same command",
        errno.ENOSPC: "free disk space and rerun the same command",
        errno.ENOMEM: "free memory and rerun the same command",
    }

    def __init__(self, path: Path, e: OSError):
        fix = self.FIXES.get(e.errno, "fix the cause and rerun the same command")
        reason = e.strerror or str(e).splitlines()[0]
        super().__init__(f"{path}: cannot read this shard of finished work ({reason}); every shard is kept: {fix}")




def _write_rows(f: h5py.Group, rows: SplitRows) -> None:
    f.create_dataset("features", data=rows.features.astype(np.float32, copy=False))
    f.create_dataset("labels", data=np.asarray(rows.labels, dtype=np.int64))
    f.create_dataset("paths", data=np.array(rows.paths, dtype=object), dtype=STR)
    f.create_dataset("views", data=np.asarray(rows.views, dtype=np.int16))
    write_table(f, "files", rows.files, ("paths", "size", "mtime_ns"))
    write_table(f, "skipped", rows.skipped, ("paths", "reasons"))
    describe_split(f)  # a shard is self-describing too (the sharded store's output shards are read as they are)
