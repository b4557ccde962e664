"""Resuming an extract: the parts folder of one configuration, and what is already done.

`Done` gathers the finished rows of the old cache and of the shards in `<cache>.parts/`
(keyed by split and path, with the file size and mtime that make them valid) and plans
the final cache from them. Shards are read one at a time: a torn one is deleted and
redone, an unreadable one stops the run (see `store.read_shard`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .data import FolderLayout, ImageFile
from .errors import CnnCodesError
from .runtime import atomic_path
from .store import (
    Cache,
    CacheConfig,
    RowSource,
    SplitPlan,
    image_runs,
    read_shard,
    read_table,
    shard_split,
    shard_written,
)


def prepare_parts(parts: Path, config: CacheConfig, overwrite: bool) -> None:
    """The parts folder holds shards of one configuration (its config.json stamp).

    Shards of this configuration are kept, with or without `overwrite`: rerunning an
    interrupted `--overwrite` command resumes it. Shards of another or an unknown
    configuration are discarded only with `overwrite`, otherwise refused.
    """
    stamp = parts / "config.json"
    if parts.exists() and not any(parts.glob("*.h5")):  # e.g. a run that failed before its first batch
        shutil.rmtree(parts)
    if parts.exists():
        try:
            theirs = CacheConfig.from_json(stamp.read_text())
        except FileNotFoundError:
            theirs = None
        except (ValueError, TypeError) as e:
            raise CnnCodesError(f"{stamp}: unreadable ({e}); pass --overwrite to discard the unfinished work in {parts}") from None
        except OSError as e:
            raise CnnCodesError(f"{stamp}: cannot read it ({e.strerror}); every shard is kept: fix the cause and rerun") from None
        if theirs == config:
            return
        if not overwrite:
            what = "another configuration" if theirs else "an unknown configuration (no config.json)"
            raise CnnCodesError(
                f"{parts} holds unfinished work of {what}; rerun that command to finish it, "
                f"or pass --overwrite to discard it"
            )
        shutil.rmtree(parts)
    parts.mkdir(parents=True)
    with atomic_path(stamp) as tmp:
        tmp.write_text(config.to_json())


class Done:
    """What is already extracted, from the old cache and from shards, keyed by (split, path).

    Shards are read one at a time and closed: their rows are named by path (`RowSource`),
    so any number of shards works under a small open-files limit.
    """

    def __init__(self):
        self.rows: dict[tuple[str, str], RowSource] = {}
        self.sigs: dict[tuple[str, str], tuple[int, int]] = {}
        self.skipped: dict[tuple[str, str], str] = {}
        self.written: dict[tuple[str, str], int] = {}  # when the source that said the last word on a file was written
        self.feature_dim = 0
        self.torn: list[Path] = []  # shards proven torn (an interrupted write), deleted: their images are redone

    @classmethod
    def collect(cls, old: Cache | None, parts: Path, layout: FolderLayout) -> Done:
        done = cls()
        if old is not None:
            for split in old.splits:
                done._add(split, old.file[split], old.file[split])
        for path in sorted(parts.glob("*.h5")):
            shard = read_shard(path)  # raises, keeping every shard, unless this one is proven torn
            if shard is None:
                path.unlink(missing_ok=True)  # a torn shard: its images are simply redone
                done.torn.append(path)
                continue
            with shard:
                done._add(shard_split(path), shard, path, shard_written(path, shard))
        return done

    def _add(self, split: str, g, source, written: int = -1) -> None:
        """Add one source's rows; what it records of a file supersedes what sources written before
        it said (a cached image since replaced by an unreadable file is skipped now, its old code
        dropped), in write order (`written`; the old cache, -1, is older than every shard), so a
        rank-1 shard of an earlier run never overrides a rank-0 shard of a resumed one."""
        if g["features"].shape[0]:
            self.feature_dim = int(g["features"].shape[1])
        files = read_table(g, "files")
        recorded = {p for p, _, _ in files}
        newer = {p for p in recorded if written >= self.written.get((split, p), -1)}
        for p in newer:
            self.rows.pop((split, p), None)
            self.skipped.pop((split, p), None)
            self.written[(split, p)] = written
        paths = g["paths"].asstr()[()]
        for start, stop in zip(*image_runs(paths)):
            if paths[start] in newer or paths[start] not in recorded:
                self.rows[(split, paths[start])] = RowSource(source, int(start), int(stop))
        for p, size, mtime in files:
            if p in newer:
                self.sigs[(split, p)] = (size, mtime)
        for p, reason in read_table(g, "skipped"):
            if p in newer or p not in recorded:
                self.skipped[(split, p)] = reason

    def has(self, split: str, f: ImageFile) -> bool:
        return self.sigs.get((split, f.path)) == (f.size, f.mtime_ns)

    def plans(self, layout: FolderLayout) -> dict[str, SplitPlan]:
        plans = {}
        for split, files in layout.splits.items():
            runs, labels, records, skipped = [], [], [], []
            for f in files:
                key = (split, f.path)
                if not self.has(split, f):
                    continue
                records.append((f.path, f.size, f.mtime_ns))
                if key in self.rows:
                    run = self.rows[key]
                    runs.append(run)
                    labels.append(np.full(run.stop - run.start, f.label))
                else:
                    skipped.append((f.path, self.skipped.get(key, "skipped")))
            skipped += layout.ignored.get(split, [])
            label_arr = np.concatenate(labels) if labels else np.zeros(0, np.int64)
            plans[split] = SplitPlan(runs, label_arr, records, skipped)
        return plans

    def unchanged(self, old: Cache, plans: dict[str, SplitPlan], layout: FolderLayout) -> bool:
        """True when writing `plans` would reproduce `old` exactly (nothing to do)."""
        if sorted(old.splits) != sorted(plans) or old.classes != layout.classes or old.manifest != layout.manifest:
            return False
        for split, plan in plans.items():
            g = old.file[split]
            if plan.rows != g["features"].shape[0] or any(r.group != g for r in plan.runs):
                return False
            if [r.start for r in plan.runs] != sorted(r.start for r in plan.runs):
                return False
            if not np.array_equal(plan.labels, g["labels"][()]) or plan.skipped != old.skipped(split):
                return False
        return True
