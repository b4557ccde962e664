"""`extract`: one input shard -> one output shard, then one small index, whatever the input.

Rank 0 plans (stats every input shard; takes each output shard's origin from the index where
the shard is the file the index recorded, else reads its attributes; never opens an input shard
that is done), every rank takes whole input shards from a shared queue (largest
first; a rank that is free takes the next) and writes each as one atomic output shard, and
after one barrier rank 0 writes the index (`store.sharded.write_index`). A killed run loses
at most the shard each process was on; every output shard depends on its input shard alone,
batched from the shard's start, so the result is the same for any number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from .. import distributed
from ..errors import CnnCodesError
from ..runtime import FileLock
from ..uptodate import up_to_date
from ..sources import InputShard, ShardSource
from ..store import FORMAT, Cache, CacheConfig, read_computed
from ..store.sharded import (STORE, ShardEntry, indexed_entries, output_shard, read_output_shard, shards_folder,
                             write_index)
from .runner import library_versions
from .shard_worker import ShardExtractor, ShardJob, ShardReport


@dataclass
class ShardPlan:
    jobs: list[ShardJob]
    outputs: dict[str, list[tuple[InputShard, Path]]]  # every input shard of each split and its output
    done: int = 0  # input shards skipped as done
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # names this run's work queue
    known: dict[Path, ShardEntry] = field(default_factory=dict)  # the done shards' entries (rank 0 only)


def plan_shards(source: ShardSource, folder: Path, config: CacheConfig, identity: str, overwrite: bool,
                strict: bool = False, indexed: dict[Path, ShardEntry] | None = None) -> ShardPlan:
    """Which input shards to extract: every one without a valid output shard of this configuration
    (`strict`: a done shard that skipped samples is refused, as its first run would have been).
    `indexed`: entries of output shards the index vouches for (`store.sharded.indexed_entries`).

    An output shard is named after its input shard and a version (a hash of the input's signature
    and labels): a changed input gets a new file, and the one the index names stays readable until
    the new index replaces it (`remove_superseded`)."""
    plan = ShardPlan([], {})
    indexed = indexed or {}
    differences = functools.lru_cache(maxsize=None)(lambda text: _differences(config, text))  # one per config seen
    for split, shards in source.shards().items():
        plan.outputs[split] = []
        present = _present(folder / split)
        stems = {_stem_of(n) for n in present}  # input shards with an output of some version
        for shard in shards:
            out = output_shard(folder, split, f"{shard.name}-{shard_version(shard, identity)}")
            legacy = output_shard(folder, split, shard.name)  # unversioned: written by cnncodes <= 0.1.0
            if out.name not in present and legacy.name in present:
                out = legacy
            entry = indexed.get(out) or (read_output_shard(out) if out.name in present else None)
            why = _why_redo(entry, out, shard, differences, identity, overwrite)
            if out == legacy and why is not None:  # a legacy shard is redone under the versioned name
                out = output_shard(folder, split, f"{shard.name}-{shard_version(shard, identity)}")
            plan.outputs[split].append((shard, out))
            if why is None and strict and entry.skipped:
                name, reason = entry.skipped[0]
                raise CnnCodesError(f"{shard.path}: {name}: {reason} (--strict: fix the shard, or drop --strict to skip it)")
            if why is None:
                plan.done += 1
                plan.known[out] = entry
            else:
                changed = why == "new" and shard.name in stems
                plan.jobs.append(ShardJob(split, shard, out, "changed" if changed else why))
    return plan


def shard_version(shard: InputShard, identity: str) -> str:
    """8 hex digits naming what an output shard was made from: its input's signature and labels."""
    text = json.dumps([shard.signature(), identity], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _version_of(filename: str, stem: str) -> bool:
    """Whether `filename` is an output shard of the input shard `stem` (any version, or unversioned)."""
    if filename == f"{stem}.h5":
        return True
    rest = filename[len(stem) + 1:] if filename.startswith(f"{stem}-") else ""
    return len(rest) == 11 and rest.endswith(".h5") and all(c in "0123456789abcdef" for c in rest[:8])


def _stem_of(filename: str) -> str:
    """The input shard an output shard file belongs to (`_version_of`'s inverse)."""
    stem = filename[:-3]
    head, _, version = stem.rpartition("-")
    return head if head and len(version) == 8 and all(c in "0123456789abcdef" for c in version) else stem


def _present(folder: Path) -> set[str]:
    """The output shard files of one split folder: one listing, not one stat per shard."""
    try:
        return {e.name for e in os.scandir(folder) if e.name.endswith(".h5")}
    except FileNotFoundError:
        return set()


def remove_superseded(plan: ShardPlan, indexed: set[Path]) -> int:
    """Delete the older versions of every input shard the new index holds: their work is superseded
    by the version it names (proven: the index was written first). Output shards of inputs that left
    the input, or that failed this run, are kept. Returns the files removed."""
    removed = 0
    for split, pairs in plan.outputs.items():
        if not pairs:
            continue
        by_stem: dict[str, list[str]] = {}
        for name in _present(pairs[0][1].parent):
            by_stem.setdefault(_stem_of(name), []).append(name)
        for shard, out in pairs:
            if out not in indexed:
                continue
            for name in by_stem.get(shard.name, []):
                if name != out.name and _version_of(name, shard.name):
                    (out.parent / name).unlink(missing_ok=True)
                    removed += 1
    return removed


def _differences(config: CacheConfig, text: str) -> tuple[str, ...]:
    """How a recorded configuration (JSON) differs from `config` (a decoder version bump is no change)."""
    try:
        return tuple(config.differences(CacheConfig.from_json(text)))
    except (ValueError, TypeError):
        return ("its configuration is unreadable",)


def _why_redo(entry: ShardEntry | None, out: Path, shard: InputShard, differences, identity: str,
              overwrite: bool) -> str | None:
    if entry is None:
        return "torn" if out.exists() else "new"  # a torn shard (written whole, then damaged) is redone
    o = entry.origin
    diffs = differences(o.get("config", ""))
    if diffs:
        if not overwrite:
            raise CnnCodesError(f"{out}: an output shard of another configuration ({'; '.join(diffs)}); write to another -o, "
                                f"or pass --overwrite to replace it")
        return "another configuration"
    if o.get("input") != identity:
        return "relabelled"  # e.g. a class added to a folder: the same codes, other labels
    if {k: o.get(k, "") for k in shard.signature()} != shard.signature():
        return "changed"
    return None


def largest_first(jobs: list[ShardJob]) -> list[ShardJob]:
    """The order ranks take shards from the queue: the big ones first, so the last to finish are small."""
    return sorted(jobs, key=lambda j: -j.shard.size)


def extract_shards(source: ShardSource, out: Path, options, cache, info, pre, dev, overwrite: bool, progress: bool,
                   request: str, log) -> dict:
    """The sharded `extract` on every rank: plan (rank 0), extract whole shards, index (rank 0).

    Returns what `api.extract` reports: report (ShardReport summed over ranks), plan counts,
    split_counts and skipped (rank 0), up_to_date."""
    from .runner import Runner

    main = distributed.is_main()
    folder = shards_folder(out)
    identity = json.dumps(source.identity(), sort_keys=True)
    with contextlib.ExitStack() as stack:
        error, plan = None, None
        if main:
            try:
                stack.enter_context(FileLock(out, what=f"cache {out}"))  # one writer per store
                _refuse_other_cache(out, overwrite, input_kind(source.identity()))
                _remove_temporaries(folder)
                indexed = {} if overwrite else indexed_entries(out, cache)
                plan = plan_shards(source, folder, cache, identity, overwrite, options.strict, indexed)
            except CnnCodesError as e:
                error = str(e)
        distributed.share_error(error, dev)
        known = plan.known if main else {}
        plan = distributed.broadcast_object(dataclasses.replace(plan, known={}) if main else None)
        report = ShardReport()
        computed = read_computed(out) if out.exists() else {}  # kept when this run extracts nothing
        runner = Runner(options, cache, info, pre, dev, log if main else None) if plan.jobs else None
        if main and log:  # once the network is built: a bad weights file is the only line
            why = Counter(j.why for j in plan.jobs)
            log(f"{sum(map(len, plan.outputs.values()))} input shards: {plan.done} done, {len(plan.jobs)} to extract"
                + (f" ({', '.join(f'{n} {w}' for w, n in why.items())})" if why else "")
                + f" by {distributed.world_size()} process(es)")
        if runner is not None:
            computed = runner.computed_with
            queue = distributed.WorkQueue(f"shards/{plan.token}")  # the store outlives one call under torchrun
            report = ShardExtractor(runner, options, cache, source, log if main else None).run(
                largest_first(plan.jobs), queue, progress and main)
        reports = distributed.gather_to_main(report)
        report = ShardReport.merge(reports) if main else report
        result = {"report": report, "done": plan.done, "up_to_date": False, "split_counts": {}, "skipped": []}
        if main:
            same = None if plan.jobs or report.failed else up_to_date(source, out, request, options.strict)
            if same is not None:  # nothing to do and the index already says so: it is not rewritten
                result.update(up_to_date=True, split_counts=same.split_counts, skipped=same.skipped)
            else:
                result.update(_write_index(out, plan, known, cache, source, request, report, computed))
                remove_superseded(plan, result.pop("indexed"))
        distributed.barrier()  # other ranks return once the index is complete
    return result


def _write_index(out: Path, plan: ShardPlan, known: dict[Path, ShardEntry], cache, source: ShardSource, request: str,
                 report: ShardReport, computed: dict | None = None) -> dict:
    """Index every input shard with a valid output shard, in input order (failed ones are left out).
    The entries come from the plan (done shards) and the ranks (new ones): no shard is opened again."""
    failed = {p for p, _ in report.failed}
    known = {**known, **{e.path: e for e in report.entries}}
    entries: dict[str, list[ShardEntry]] = {}
    for split, pairs in plan.outputs.items():
        entries[split] = [e for shard, path in pairs
                          if shard.path not in failed and (e := known.get(path) or read_output_shard(path)) is not None]
    every = [e for es in entries.values() for e in es]
    dim = max((e.feature_dim for e in every), default=0)
    names = source.classes() or [str(i) for i in range(max((e.max_label for e in every), default=-1) + 1)]
    ignored = source.ignored() if hasattr(source, "ignored") else {}  # e.g. a folder's non-image files
    write_index(out, cache, names, dim, entries, ignored, library_versions(), request, source.identity(), computed,
                getattr(source, "manifest", None))
    skipped = [s for split, es in entries.items() for s in [x for e in es for x in e.skipped] + ignored.get(split, [])]
    return {"split_counts": {s: sum(e.rows for e in es) for s, es in entries.items()}, "skipped": skipped,
            "up_to_date": not plan.jobs, "indexed": {e.path for e in every}}


def input_kind(identity: dict) -> str:
    """What kind of input a source identity names: folder, manifest, parquet or webdataset."""
    return identity.get("input", "webdataset")


def _refuse_other_cache(out: Path, overwrite: bool, kind: str) -> None:
    """Only an index is rewritten (its shards decide what is done): an ordinary cache or any other
    file at `out` is finished work of another kind, replaced only with --overwrite."""
    if overwrite or not out.exists():
        return
    try:
        with h5py.File(out, "r") as f:
            fmt, store, indexed = f.attrs.get("format"), f.attrs.get("store"), f.attrs.get("source", "{}")
    except OSError:
        fmt = store = indexed = None
    if fmt == FORMAT and store == STORE:
        try:
            Cache(out, sources=False).close()  # a damaged index is refused, like any damaged cache
        except CnnCodesError as e:
            raise CnnCodesError(f"{e}; or pass --overwrite to replace it (its finished shards are kept)") from None
        other = input_kind(json.loads(indexed))
        if other != kind:
            raise CnnCodesError(f"{out} indexes the codes of another input ({other}, not {kind}); write to another -o, "
                                f"or pass --overwrite to replace it")
        return
    if fmt == FORMAT:  # written by `cnncodes pack`, or by a cnncodes before every input was sharded
        raise CnnCodesError(f"{out} is a one-file cache (packed, or from an earlier cnncodes); it reads as it is, "
                            f"but is not extended in place: pass --overwrite to extract it again as a sharded store, "
                            f"or write to another -o")
    raise CnnCodesError(f"{out} is not a cnncodes index; write the codes to another -o, or pass --overwrite to replace it")


def _remove_temporaries(folder: Path) -> None:
    """Temporary files of output shards a killed run was writing (never finished work)."""
    if folder.is_dir():
        for tmp in folder.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)
