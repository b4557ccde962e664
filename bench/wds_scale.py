"""WebDataset extraction at scale: bookkeeping overhead, peak memory, no-op rerun, kill -9 and resume.

    python bench/wds_scale.py                                   # the full run: 10^4 and 10^5 images, 100 shards
    python bench/wds_scale.py --images 2000,4000 --per-shard 200 --repeats 1 --name wds_scale_small

A generated WebDataset (distinct small JPEGs, `--per-shard` samples per tar; the smaller sizes
use the first shards of the largest) is extracted with resnet18 `--weights none --image-size 64`
by a real `cnncodes extract` process (`--procs N`: torchrun). For each size:
  - bookkeeping overhead = 1 - (in-memory time / command time): the in-memory time is the same
    samples through the same decode, views and network (ShardExtractor's batch step, same batch
    size and threads), their bytes already in memory, nothing stored, in a fresh process; the
    command time is the whole `cnncodes extract` (start-up, imports, reading the tars, output
    shards, index);
  - peak RSS of the command (wait4's ru_maxrss: the largest process of the run);
then, on the largest size: a no-op rerun (all shards done), kill -9 once half the output shards
exist and rerun (finished shards redone must be 0: the work lost is the shard each process was
on), and the index: its write time, size, and a full and a shuffled-piece read against a packed
copy; the index over --index-shards tiny shards (write, size, open); a simulation of three ways
to give shards to 64 ranks. Medians of --repeats. Results to bench/results/<name>.json (table in docs/scale.md).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, hardware, results_header, write_results  # noqa: E402

ARGS = ["--weights", "none", "--image-size", "64", "-q"]


def write_dataset(folder: Path, images: int, per_shard: int, size: int = 72) -> list[Path]:
    """`images` distinct smooth JPEGs (a random 6x6 colour field, upsampled), labels 0..9 in .cls."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for s in range(0, images, per_shard):
        path = folder / f"train-{s // per_shard:06d}.tar"
        shards.append(path)
        if path.exists():
            continue
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(s, min(s + per_shard, images)):
                field = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(field).resize((size, size), Image.BICUBIC).save(buf, "JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.rename(path)
    return shards


def shard_list(folder: Path, shards: list[Path]) -> Path:
    listing = folder / f"first-{len(shards)}.txt"
    listing.write_text("".join(f"{p}\n" for p in shards))
    return listing


def command(listing: Path, out: Path, procs: int) -> list[str]:
    cmd = ["-m", "cnncodes", "extract", str(listing), "-o", str(out), *ARGS]
    if procs > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cmd]
    return [sys.executable, *cmd]


def run_command(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the largest process, stdout) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()  # reads the pipes, then reaps the child ...
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err}")
    return wall, _peak_rss_mb(), out


_PEAK = [0.0]


def _peak_rss_mb() -> float:
    """... so the peak is read from RUSAGE_CHILDREN: the largest reaped descendant so far. Each
    measured command runs in a fresh `--one` subprocess of this script, so the figure is its own."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def in_memory_seconds(shards: list[Path], batch_size: int | None) -> float:
    """The same samples through decode + views + network alone: their bytes already in memory."""
    import torch

    from cnncodes.backbones import resolve_preprocessing, resolve_weights
    from cnncodes.extract import ExtractConfig
    from cnncodes.extract.runner import Runner
    from cnncodes.extract.shard_worker import ShardExtractor, ShardJob, _Rows
    from cnncodes.runtime import inference_batch_size
    from cnncodes.sources import InputShard, Item
    from cnncodes.sources.webdataset import WebDatasetSource, read_samples

    dev = torch.device("cpu")
    options = ExtractConfig(arch="resnet18", weights="none", image_size=64,
                            batch_size=batch_size or inference_batch_size(dev), decode="cpu")
    info = resolve_weights("resnet18", "none")
    pre = resolve_preprocessing("resnet18", info, 64)
    cache = _Config()
    runner = Runner(options, cache, info, pre, dev)
    step = ShardExtractor(runner, options, cache, WebDatasetSource({"train": ("-",)}))
    batches = []
    for path in shards:
        samples = [Item(f"{path.name}/{s.key}", s.files["jpg"], int(s.files["cls"]), "jpg") for s in read_samples(str(path))]
        batches += [samples[i:i + options.batch_size] for i in range(0, len(samples), options.batch_size)]
    job = ShardJob("train", InputShard("-", 0, 0, "-"), Path("-"), "new")
    start = time.perf_counter()
    for batch in batches:
        step.run_batch(job, batch, _Rows(1))  # rows dropped: nothing stored
    seconds = time.perf_counter() - start
    step.pool.shutdown()
    return seconds


class _Config:
    """What the batch step reads of a CacheConfig."""

    arch, layers, seed = "resnet18", "", 0

    def views_for(self, split: str) -> int:
        return 0


def one(args) -> None:
    """`--one`: run one measured command in this fresh process and print wall, peak RSS."""
    wall, rss, out = run_command(command(Path(args.listing), Path(args.out), args.procs))
    print(f"RESULT {wall} {rss}")
    print(out)


def memory_in_fresh_process(listing: Path) -> float:
    """`in_memory_seconds` in a fresh interpreter, like the command: this process has asked torch
    about CUDA (the results header), and on this machine that alone slowed the CPU pass 20-40%."""
    proc = subprocess.run([sys.executable, __file__, "--memory", "--listing", str(listing)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return float(re.search(r"MEMORY ([\d.]+)", proc.stdout).group(1))


def measured(listing: Path, out: Path, procs: int) -> tuple[float, float, str]:
    proc = subprocess.run([sys.executable, __file__, "--one", "--listing", str(listing), "--out", str(out),
                           "--procs", str(procs)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    m = re.search(r"RESULT ([\d.]+) ([\d.]+)", proc.stdout)
    return float(m.group(1)), float(m.group(2)), proc.stdout


def kill_and_resume(listing: Path, out: Path, procs: int, total: int) -> dict:
    """kill -9 once half the output shards exist, then rerun: finished shards redone must be 0."""
    folder = out.with_name(out.stem + ".shards") / "train"
    proc = subprocess.Popen(command(listing, out, procs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while len(list(folder.glob("*.h5"))) < total // 2 and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5")}
    wall, _, text = measured(listing, out, procs)
    done = int(re.search(r"(\d+) shards skipped as done", text).group(1))
    extracted = int(re.search(r"from (\d+) input shards", text).group(1))
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5")}
    return {"shards": total, "finished_at_kill": len(finished), "rerun_skipped_as_done": done,
            "rerun_extracted_shards": extracted, "finished_shards_redone": sum(after[k] != v for k, v in finished.items()),
            "lost_at_most_shards": procs, "rerun_seconds": round(wall, 2)}


def index_figures(out: Path, tmp: Path) -> dict:
    """Index write time (reading every output shard's entry, as rank 0 does) and size; full and
    shuffled-block reads (the streaming heads' `iter_blocks`) of the index against a packed copy."""
    import h5py

    from cnncodes.heads.codes import iter_blocks
    from cnncodes.store import Cache
    from cnncodes.store.pack import pack
    from cnncodes.store.sharded import index_shards, read_output_shard, write_index

    with Cache(out) as c:
        config, classes, dim = c.config, c.classes, c.feature_dim
        outputs = [out.parent / p for p, _, _ in index_shards(c.file["train"])]
    copy = out.with_name("index-copy.h5")  # beside the shards: its relative paths resolve
    start = time.perf_counter()
    entries = [read_output_shard(p) for p in outputs]
    write_index(copy, config, classes, dim, {"train": entries}, {"train": []}, {}, "", {})
    write_s = time.perf_counter() - start
    size = copy.stat().st_size
    copy.unlink()
    packed = tmp / "packed.h5"
    pack(out, packed)
    reads = {}
    for name, path in (("index", out), ("packed", packed)):
        with h5py.File(path) as f:
            x = f["train/features"]
            t = time.perf_counter()
            x[()]
            full = time.perf_counter() - t
            t = time.perf_counter()
            for _ in iter_blocks(x, np.random.default_rng(0)):
                pass
            reads[name] = {"full_read_s": round(full, 3), "shuffled_blocks_s": round(time.perf_counter() - t, 3)}
    packed.unlink()
    return {"shards": len(entries), "index_write_s": round(write_s, 3), "index_bytes": size, "reads": reads}


def index_scale(shards: int, folder: Path, dim: int = 2048) -> dict:
    """The index at the projection's scale: `shards` output shards of 2 rows (dim 2048): a rerun's
    plan without the index (every shard's attributes read) and with it (the index vouches for the
    shards whose size and mtime it recorded: one listing and one stat each), writing the index
    (rank 0's end step: the ranks hand it the new shards' entries), its size, and opening it
    (`Cache` checks every shard it names)."""
    from cnncodes.extract.sharded import plan_shards, shard_version
    from cnncodes.sources import InputShard
    from cnncodes.store import Cache, CacheConfig, SplitRows
    from cnncodes.store.sharded import indexed_entries, output_shard, read_output_shard, write_index, write_output_shard

    config = CacheConfig("resnet50", "none:seed0", "none", "fp32", {})
    identity = "{}"
    inputs = [InputShard(f"/in/train-{i:06d}.tar", 1, 1, f"train-{i:06d}") for i in range(shards)]
    store = folder / "codes.shards"
    paths = [output_shard(store, "train", f"{s.name}-{shard_version(s, identity)}") for s in inputs]
    for i, (s, p) in enumerate(zip(inputs, paths)):
        if not p.exists():
            rows = SplitRows(np.zeros((2, dim), np.float32), np.zeros(2, np.int64), [f"{i}/a", f"{i}/b"], np.zeros(2, np.int16))
            write_output_shard(p, rows, {**s.signature(), "samples": 2, "damaged": 0, "config": config.to_json(),
                                         "input": identity, "split": "train", "max_label": 0})

    class Source:  # the plan's view of an input: its shards
        def shards(self):
            return {"train": inputs}

    start = time.perf_counter()
    entries = [read_output_shard(p) for p in paths]
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    write_index(folder / "codes.h5", config, ["a"], dim, {"train": entries}, {"train": []}, {}, "", {})
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    Cache(folder / "codes.h5").close()
    open_s = time.perf_counter() - start
    plan_s = []
    for use_index in (False, True):
        start = time.perf_counter()
        indexed = indexed_entries(folder / "codes.h5", config) if use_index else {}
        plan = plan_shards(Source(), store, config, identity, False, False, indexed)
        plan_s.append(time.perf_counter() - start)
        assert plan.done == shards and not plan.jobs, (plan.done, len(plan.jobs))
    return {"shards": shards, "read_entries_s": round(read_s, 2), "index_write_s": round(write_s, 2),
            "index_bytes": (folder / "codes.h5").stat().st_size, "open_s": round(open_s, 2),
            "plan_without_index_s": round(plan_s[0], 2), "plan_with_index_s": round(plan_s[1], 2)}


def deal(jobs: list, world: int, rank: int) -> list:
    """A static alternative to cnncodes' shared queue: largest first to the least loaded rank, by bytes."""
    load = [0] * world
    mine = []
    for i in sorted(range(len(jobs)), key=lambda i: (-jobs[i].shard.size, i)):
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += max(jobs[i].shard.size, 1)
        if r == rank:
            mine.append(i)
    return [jobs[i] for i in sorted(mine)]


def balance_figures(shards: int = 10_000, ranks: int = 64, seed: int = 0) -> dict:
    """Makespan / ideal of three ways to give whole shards to ranks (time = shard bytes / rank speed),
    simulated: shard i -> rank i mod N; `deal` (largest first to the least loaded, by bytes); a shared
    work queue, largest first (a free rank takes the next shard: what cnncodes does). Cases: equal shards,
    sizes lognormal (sigma 0.5), a rerun with a random half already done, and ranks 10% apart in speed."""
    from cnncodes.extract.shard_worker import ShardJob
    from cnncodes.sources import InputShard

    rng = np.random.default_rng(seed)
    cases = {"equal shards": np.full(shards, 1000.0), "sizes lognormal 0.5": rng.lognormal(0, 0.5, shards) * 1000}
    half = cases["sizes lognormal 0.5"].copy()
    half[rng.random(shards) < 0.5] = 0
    cases["rerun, random half done"] = half
    speeds = {"same speed": np.ones(ranks), "speeds 0.9-1.1": rng.uniform(0.9, 1.1, ranks)}
    out = {}
    for case, sizes in cases.items():
        todo = [i for i in range(shards) if sizes[i] > 0]
        for sname, speed in speeds.items():
            ideal = sizes.sum() / speed.sum()
            modn = np.zeros(ranks)
            for k, i in enumerate(todo):  # i mod N over the full list: the done ones leave holes
                modn[i % ranks] += sizes[i] / speed[i % ranks]
            jobs = [ShardJob("train", InputShard(str(i), int(sizes[i]), 0, str(i)), Path(str(i)), "new") for i in todo]
            lpt = np.array([sum(j.shard.size for j in deal(jobs, ranks, r)) / speed[r] for r in range(ranks)])
            free = np.zeros(ranks)
            for i in sorted(todo, key=lambda i: -sizes[i]):  # the queue, largest first: the rank free first takes the next
                r = int(np.argmin(free))
                free[r] += sizes[i] / speed[r]
            out[f"{case}, {sname}"] = {"i mod N": round(float(modn.max() / ideal), 3), "deal by bytes": round(float(lpt.max() / ideal), 3),
                                       "shared queue (cnncodes)": round(float(free.max() / ideal), 3)}
    return {"shards": shards, "ranks": ranks, "makespan_over_ideal": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="10000,100000", help="sizes, comma-separated (multiples of --per-shard)")
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--procs", type=int, default=1, help="processes (torchrun) per command")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the dataset and stores go (kept for reruns)")
    ap.add_argument("--name", default="wds_scale", help="results file bench/results/NAME.json")
    ap.add_argument("--index-shards", type=int, default=10_000, help="shards of the index-at-scale measurement")
    ap.add_argument("--index-only", action="store_true", help="only the index-at-scale measurement")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--listing", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    if args.memory:
        shards = [Path(line) for line in Path(args.listing).read_text().split()]
        print(f"MEMORY {in_memory_seconds(shards, None)}")
        return None
    result = results_header(args.name)
    if args.index_only:  # the index at the projection's scale alone (docs/scale.md's 10^8 projection)
        scale = index_scale(args.index_shards, Path(args.dir) / f"cnncodes-wds-index-{args.index_shards}")
        print(f"index over {args.index_shards} shards: {scale}")
        result.update({"index_scale": scale, "table": {
            "columns": ["output shards", "a rerun's plan without the index s", "with the index s",
                        "write the index s", "index bytes", "open it s"],
            "rows": [[scale["shards"], scale["plan_without_index_s"], scale["plan_with_index_s"], scale["index_write_s"],
                      scale["index_bytes"], scale["open_s"]]]},
            "notes": ["rank 0's work around a sharded extract at this many shards (2 rows of dim 2048 each): a rerun's "
                      "plan, reading every output shard's attributes, or trusting the index for the shards whose size "
                      "and mtime it recorded; the end step writes the index; opening it checks every shard it names"]})
        write_results(result, RESULTS / f"{args.name}.json")
        return None
    sizes = sorted(int(v) for v in args.images.split(","))
    root = Path(args.dir) / f"cnncodes-wds-bench-{args.per_shard}"
    start = time.perf_counter()
    shards = write_dataset(root / "wds", sizes[-1], args.per_shard)
    print(f"# {hardware()}\n# dataset: {len(shards)} shards in {root / 'wds'} ({time.perf_counter() - start:.0f} s)", flush=True)
    rows = []
    for n in sizes:
        mine = shards[:n // args.per_shard]
        listing = shard_list(root, mine)
        memory = statistics.median(memory_in_fresh_process(listing) for _ in range(args.repeats))
        runs = []
        for r in range(args.repeats):
            out = root / f"store-{n}-{r}" / "codes.h5"
            subprocess.run(["rm", "-rf", str(out.parent)], check=True)
            wall, rss, _ = measured(listing, out, args.procs)
            runs.append((wall, rss))
        wall = statistics.median(w for w, _ in runs)
        rss = max(r for _, r in runs)
        noop = statistics.median(measured(listing, out, args.procs)[0] for _ in range(args.repeats))
        row = [n, len(mine), round(memory, 1), round(wall, 1), round(1 - memory / wall, 3), round(rss), round(noop, 2)]
        rows.append(row)
        print(f"{n} images, {len(mine)} shards: in memory {memory:.1f} s, command {wall:.1f} s, overhead "
              f"{100 * (1 - memory / wall):.1f}%, peak RSS {rss:.0f} MB, no-op rerun {noop:.2f} s", flush=True)
    scale = index_scale(args.index_shards, root / f"index-{args.index_shards}")
    print(f"index over {args.index_shards} shards: {scale}", flush=True)
    balance = balance_figures()
    print(f"balance (makespan / ideal, 10^4 shards on 64 ranks): {balance['makespan_over_ideal']}", flush=True)
    listing = shard_list(root, shards)
    kill = kill_and_resume(listing, root / "store-kill" / "codes.h5", args.procs, len(shards))
    print(f"kill -9 at half: {kill}", flush=True)
    index = index_figures(root / f"store-{sizes[-1]}-0" / "codes.h5", root)
    print(f"index: {index}", flush=True)
    result.update({
        "arch": "resnet18", "image_size": 64, "weights": "none", "procs": args.procs, "repeats": args.repeats,
        "per_shard": args.per_shard, "sizes": sizes, "kill": kill, "index": index, "index_scale": scale, "balance": balance,
        "table": {"columns": ["images", "shards", "in-memory s", "command s", "bookkeeping overhead",
                              "peak RSS MB", "no-op rerun s"], "rows": rows},
        "notes": [f"resnet18 --weights none --image-size 64, {args.per_shard} JPEGs (72 px) per shard, "
                  f"{args.procs} process(es); medians of {args.repeats}; overhead = 1 - in-memory / command",
                  f"kill -9 at half ({kill['finished_at_kill']} of {kill['shards']} shards finished): the rerun skipped "
                  f"{kill['rerun_skipped_as_done']} as done, extracted {kill['rerun_extracted_shards']}, redid "
                  f"{kill['finished_shards_redone']} finished shards",
                  f"index over {index['shards']} shards: written in {index['index_write_s']} s, "
                  f"{index['index_bytes'] / 1e3:.0f} kB; reads (full / shuffled blocks, s): index "
                  f"{index['reads']['index']['full_read_s']} / {index['reads']['index']['shuffled_blocks_s']}, "
                  f"packed {index['reads']['packed']['full_read_s']} / {index['reads']['packed']['shuffled_blocks_s']}",
                  f"index over {scale['shards']} tiny shards: their attributes read in {scale['read_entries_s']} s "
                  f"(a rerun's plan), the index written in {scale['index_write_s']} s (the end step), "
                  f"{scale['index_bytes'] / 1e6:.2f} MB, opened in {scale['open_s']} s"],
    })
    write_results(result, RESULTS / f"{args.name}.json")
    print(f"wrote {RESULTS / f'{args.name}.json'}")


if __name__ == "__main__":
    main()
