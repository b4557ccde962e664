"""`extract` beside other jobs: throughput and CPU per image alone and beside busy neighbours, per setting.

    python bench/neighbour.py --before /tmp/before          # settings at the commit before the fix + this tree's default
    python bench/neighbour.py --settings default,passive --neighbours spin2 --repeats 1
    python bench/neighbour.py --input wds
    python bench/neighbour.py --before /tmp/before --quiet-ab 10    # the fix's quiet cost: 10 alternating quiet pairs

A synthetic input (2,000 distinct 72-px JPEGs: a class folder tree, or WebDataset shards made by
bench/wds_scale.py) is extracted by a real `cnncodes extract` process (`python -m cnncodes` run in
the checkout measured; resnet18 --weights none --image-size 64, a fresh output folder each run), per
setting: alone (quiet), then beside each neighbour (--neighbours), which starts first and runs until
the extract ends: `spinN` = N `while True: pass` processes, `extract` = the same command to another
output, in a loop. Per run: wall of the whole command, the extraction loop's seconds (the command's
summary line), the child's CPU time (user + system of it and its reaped children, from wait4), and
the neighbour's cores. Medians of --repeats, the settings taken in turn within each repeat.

Other jobs on the machine (a shared one): before each run the bench waits until the rest of the
machine uses under --quiet-cores cores (/proc/stat over 1 s); after it, the cores the rest used
meanwhile (all busy time less the command's and the neighbour's CPU) are recorded, and a run where
they exceeded --quiet-cores is discarded (kept in the results) and run again (--retries).

Fair share: a process running `cores` busy threads beside N busy neighbour threads gets cores / (cores
+ N) of the machine (0.5 beside a second extract); a good neighbour keeps at least that share of its
quiet loop throughput, and its CPU time per image within 1.5x of quiet. The codes of every run are
hashed (features and paths): a setting that changes them is marked. The idle spin of torch's OpenMP
worker (CPU ms per parallel region followed by 10 ms of nothing) is measured for each setting too.

Settings (--settings, comma-separated names; env vars are set for the command only):
  default        nothing set: what the measured checkout does on its own
  passive        OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep at once)
  spinN          GOMP_SPINCOUNT=N (libgomp's spins before sleeping; unset = 300000)
  kmp            KMP_BLOCKTIME=0 (Intel OpenMP only: a control, this torch's libgomp ignores it)
  intra1         1 intra-op thread (torch.set_num_threads(1) in place of the cores), decode threads unchanged
  intra1-passive intra1 + OMP_WAIT_POLICY=PASSIVE
  workers1       --workers 1: one decode thread (the sharded pipeline's decode pool is --workers or the
                 cores; in trees before eee56f3 the folder path started a DataLoader worker process)
With --before DIR (a checkout of the commit before a fix) every setting runs there, and
`default` runs on --tree too (row "this tree: default").
Results to bench/results/<name>.json and .txt (table in docs/scale.md, "Beside other jobs").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, RESULTS, hardware, results_header, write_results  # noqa: E402

ARGS = ["--arch", "resnet18", "--weights", "none", "--image-size", "64", "--overwrite", "-q"]

# The command with the intra-op threads fixed: the checkout's own CLI, its thread sizing replaced
# (before the command module, which imports configure_threads by name, is loaded).
SHIM = """import os, sys
import cnncodes.runtime as r
intra = int(os.environ.pop("BENCH_INTRA"))
def configure_threads(dev, _n=intra):
    import torch
    torch.set_num_threads(_n)
r.configure_threads = configure_threads
from cnncodes.cli import main
sys.argv[0] = "cnncodes"
main()
"""

SETTINGS = {
    "default": {},
    "passive": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}},
    "kmp": {"env": {"KMP_BLOCKTIME": "0"}},
    "intra1": {"intra": 1},
    "intra1-passive": {"intra": 1, "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
    "workers1": {"args": ["--workers", "1"]},
}


def setting(name: str) -> dict:
    if name in SETTINGS:
        return SETTINGS[name]
    m = re.fullmatch(r"spin(\d+)", name)
    if m:
        return {"env": {"GOMP_SPINCOUNT": m.group(1)}}
    raise SystemExit(f"unknown setting {name!r}: one of {', '.join(SETTINGS)}, spinN")


# --------------------------------------------------------------------------- input


def write_folder(root: Path, images: int, size: int = 72) -> Path:
    """`images` distinct smooth JPEGs (a random 6x6 colour field, upsampled) in 10 class folders."""
    if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == images:
        return root
    rng = np.random.default_rng(0)
    tmp = root.with_name(root.name + ".tmp")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    for i in range(images):
        d = tmp / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        field = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(field).resize((size, size), Image.BICUBIC).save(d / f"{i:06d}.jpg", quality=90)
    subprocess.run(["rm", "-rf", str(root)], check=True)
    tmp.rename(root)
    return root


def make_input(kind: str, base: Path, images: int) -> Path:
    if kind == "folder":
        return write_folder(base / f"folder-{images}", images)
    from wds_scale import shard_list, write_dataset

    folder = base / f"wds-{images}"
    return shard_list(folder, write_dataset(folder, images, per_shard=200))


# --------------------------------------------------------------------------- how long idle OpenMP threads spin

SPIN_PROBE = """import os, sys, threading, time, torch
torch.set_num_threads(2)
x, main, gap = torch.ones(1_000_000), threading.get_native_id(), float(sys.argv[1]) / 1e3
def others():  # ns on a core of every thread but this one (the OpenMP worker)
    return sum(int(open(f"/proc/self/task/{t}/schedstat").read().split()[0]) for t in os.listdir("/proc/self/task") if int(t) != main)
for _ in range(5):
    x.add_(1)
n, c0 = 100, others()
for _ in range(n):
    x.add_(1)  # a parallel region of ~0.1 ms, then `gap` ms with nothing for the worker to do
    end = time.perf_counter() + gap
    while time.perf_counter() < end:
        pass
print((others() - c0) / n / 1e6)
"""


def spin_calibration(tree: Path, spec: dict, gap_ms: float = 10.0) -> float:
    """CPU ms the OpenMP worker thread uses per parallel region followed by `gap_ms` with nothing to do
    (its share of the region, ~0.05 ms, plus its spinning), in a fresh process that imports the CLI
    first as the command does (the checkout's own OpenMP settings) with the setting's environment."""
    wait_quiet(0.3, 120)
    env = {**os.environ, "PYTHONPATH": str(tree), **spec.get("env", {})}
    proc = subprocess.run([sys.executable, "-c", "import cnncodes.cli\n" + SPIN_PROBE, str(gap_ms)], capture_output=True,
                          text=True, check=True, env=env, cwd=tree)
    return round(float(proc.stdout), 3)


# --------------------------------------------------------------------------- the machine's other load

TICK = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (user, nice, system, irq, softirq; not steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / TICK


def group_cpu(pgids: set[int]) -> float:
    """CPU seconds of the live processes of these process groups, with their reaped children's."""
    total = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) in pgids:  # pgrp; utime, stime, cutime, cstime follow at 11-14
                total += sum(int(x) for x in fields[11:15])
    return total / TICK


def busy_cores(seconds: float = 1.0) -> float:
    """Cores busy over `seconds` (everything on the machine: call it when nothing of ours runs)."""
    b0, t0 = machine_busy(), time.monotonic()
    time.sleep(seconds)
    return (machine_busy() - b0) / (time.monotonic() - t0)


def wait_quiet(limit: float, max_wait: float) -> float:
    """Wait (up to `max_wait` s) until the rest of the machine uses under `limit` cores; what it used."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = busy_cores()
        if busy < limit or time.monotonic() > deadline:
            return busy
        time.sleep(4)


# --------------------------------------------------------------------------- one run


def command(tree: Path, spec: dict, data: Path, out: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": str(tree), **spec.get("env", {})}
    if spec.get("intra"):
        env["BENCH_INTRA"] = str(spec["intra"])
        head = [sys.executable, "-c", SHIM]
    else:
        head = [sys.executable, "-m", "cnncodes"]
    return [*head, "extract", str(data), "-o", str(out), *ARGS, *spec.get("args", [])], env


def fair_share(kind: str, cores: int) -> float:
    """The machine's share a process running `cores` busy threads gets beside the neighbour `kind`."""
    return 0.5 if kind == "extract" else cores / (cores + int(kind[4:]))


def start_neighbour(kind: str, tree: Path, spec: dict, data: Path, tmp: Path) -> list[subprocess.Popen]:
    """The neighbour (`spinN`: N `while True: pass` processes; `extract`: the same command to another
    output, over and over), each process in its own process group (to count its CPU and stop all of
    it) but in the bench's session: the kernel's autogroup then shares the cores per thread, as
    between jobs of one user."""
    if kind.startswith("spin"):
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], process_group=0) for _ in range(int(kind[4:]))]
    else:
        argv, env = command(tree, spec, data, tmp / "neighbour" / "codes.h5")
        (tmp / "neighbour").mkdir(exist_ok=True)
        loop = (f"while :; do rm -rf {_quote(str(tmp / 'neighbour'))}/*; "  # a fresh store each time, as the measured one
                f"{' '.join(_quote(a) for a in argv)} >/dev/null 2>&1; done")
        procs = [subprocess.Popen(["bash", "-c", loop], env=env, cwd=tree, process_group=0)]
    time.sleep(1.0 if kind.startswith("spin") else 3.0)  # the neighbour is busy before the extract starts
    return procs


def stop_neighbour(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def codes_hash(path: Path) -> str:
    """sha256 of every split's features and paths, in file order."""
    import h5py

    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for split in sorted(k for k in f if isinstance(f[k], h5py.Group) and "features" in f[k]):
            h.update(split.encode())
            h.update(np.ascontiguousarray(f[split]["features"][()]).tobytes())
            h.update("\n".join(p.decode() if isinstance(p, bytes) else str(p) for p in f[split]["paths"][()]).encode())
    return h.hexdigest()[:16]


def run_once(tree: Path, spec: dict, data: Path, out: Path, images: int, neighbour: list[subprocess.Popen] = ()) -> dict:
    """One measured command: wall, loop seconds (its summary line), CPU of the child (wait4), and the
    cores the rest of the machine used meanwhile (all busy time less the child's and the neighbour's)."""
    pgids = {p.pid for p in neighbour}
    subprocess.run(["rm", "-rf", str(out.parent)], check=True)  # a fresh store: no shard of an earlier run is reused
    out.parent.mkdir(parents=True)
    argv, env = command(tree, spec, data, out)
    busy0, theirs0 = machine_busy(), group_cpu(pgids)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        proc = subprocess.Popen(argv, env=env, stdout=so, stderr=se, text=True, cwd=tree)  # -m/-c put cwd first on sys.path
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage (and its reaped workers'), not the neighbours'
        wall = time.perf_counter() - start
        busy, theirs = machine_busy() - busy0, group_cpu(pgids) - theirs0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{stderr}")
    m = re.search(r"extracted (\d+) images.* in ([\d.]+) s", stdout)
    if not m or int(m.group(1)) != images:
        raise SystemExit(f"unexpected summary from {' '.join(argv)}:\n{stdout}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": wall, "loop_s": float(m.group(2)), "cpu_s": cpu, "codes": codes_hash(out),
            "neighbour_cores": round(theirs / wall, 2), "other_cores": round(max(0.0, busy - cpu - theirs) / wall, 2),
            "vol_ctx_switches": usage.ru_nvcsw, "invol_ctx_switches": usage.ru_nivcsw}


def summarise(runs: list[dict], images: int) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "loop_s", "cpu_s", "vol_ctx_switches",
                                                               "invol_ctx_switches")}
    return {"wall_s": round(med["wall_s"], 2), "loop_s": round(med["loop_s"], 2),
            "img_per_s": round(images / med["wall_s"], 1), "loop_img_per_s": round(images / med["loop_s"], 1),
            "cpu_s": round(med["cpu_s"], 2), "cpu_ms_per_img": round(1000 * med["cpu_s"] / images, 2),
            "cores_used": round(med["cpu_s"] / med["wall_s"], 2),
            "vol_ctx_switches": int(med["vol_ctx_switches"]), "invol_ctx_switches": int(med["invol_ctx_switches"]),
            "neighbour_cores": statistics.median(r["neighbour_cores"] for r in runs),
            "other_cores_max": max(r["other_cores"] for r in runs),
            "runs": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in runs]}


def tree_commit(tree: Path | None) -> str | None:
    """The commit a checkout (a git worktree) is at, with '+dirty' when its tracked files differ."""
    if tree is None:
        return None
    try:
        git = lambda *a: subprocess.run(["git", "-C", str(tree), *a], capture_output=True, text=True, check=True).stdout.strip()
        return git("rev-parse", "--short=12", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def measure(args, tree: Path, spec: dict, data: Path, out: Path, cond: str, discarded: list, label: str) -> dict:
    """One run of `cond` ("quiet" or a neighbour), again while other jobs used the machine meanwhile."""
    for attempt in range(args.retries + 1):
        before = wait_quiet(args.quiet_cores, args.max_wait)
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            neighbour = [] if cond == "quiet" else start_neighbour(cond, tree, spec, data, Path(tmp))
            try:
                run = run_once(tree, spec, data, out, args.images, neighbour)
            finally:
                stop_neighbour(neighbour)
        run.update(other_cores_before=round(before, 2), load1=round(os.getloadavg()[0], 2))
        if run["other_cores"] <= args.quiet_cores or attempt == args.retries:
            return run
        discarded.append({"setting": label, "condition": cond, **run})
        print(f"  ({label} {cond}: other jobs used {run['other_cores']:.2f} cores meanwhile; again)", flush=True)
    raise AssertionError


def quiet_ab(args, data: Path) -> None:
    """`--quiet-ab N`: N quiet pairs, the --before checkout's default and this tree's, alternating which
    runs first; the quiet cost of the fix, added as "quiet_ab" to the results file (the rest kept)."""
    path = RESULTS / f"{args.name}.json"
    result = json.loads(path.read_text()) if path.exists() else results_header(args.name)
    trees = {"before": args.before, "after": args.tree}
    runs: dict[str, list] = {"before": [], "after": []}
    discarded: list[dict] = []
    load = os.getloadavg()[0]
    for i in range(args.quiet_ab):
        for which in (("before", "after") if i % 2 == 0 else ("after", "before")):
            out = args.dir / "out" / f"ab-{which}" / "codes.h5"
            run = measure(args, trees[which], {}, data, out, "quiet", discarded, which)
            runs[which].append(run)
            print(f"pair {i} {which:>6}: {run['wall_s']:.3f} s wall, {run['loop_s']:.1f} s loop, "
                  f"{1000 * run['cpu_s'] / args.images:.2f} ms CPU/img (others {run['other_cores']:.2f} cores)", flush=True)
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "loop_s", "cpu_s")} for w, rs in runs.items()}
    result["quiet_ab"] = {
        "pairs": args.quiet_ab, "before_commit": tree_commit(args.before), "tree_commit": tree_commit(args.tree),
        "load1_at_start": round(load, 2), "load_after": [round(v, 2) for v in os.getloadavg()],
        "before": {"median_wall_s": round(med["before"]["wall_s"], 3), "median_loop_s": med["before"]["loop_s"],
                   "median_cpu_ms_per_img": round(1000 * med["before"]["cpu_s"] / args.images, 2), "runs": runs["before"]},
        "after": {"median_wall_s": round(med["after"]["wall_s"], 3), "median_loop_s": med["after"]["loop_s"],
                  "median_cpu_ms_per_img": round(1000 * med["after"]["cpu_s"] / args.images, 2), "runs": runs["after"]},
        "wall_after_over_before": round(med["after"]["wall_s"] / med["before"]["wall_s"], 3),
        "loop_after_over_before": round(med["after"]["loop_s"] / med["before"]["loop_s"], 3),
        "pairwise_wall_ratios": [round(a["wall_s"] / b["wall_s"], 3) for a, b in zip(runs["after"], runs["before"])],
        "codes_same": len({r["codes"] for rs in runs.values() for r in rs}) == 1, "discarded_runs": discarded,
        "note": "quiet runs only, alternating which checkout runs first; wall = the whole command (ms precision), "
                "loop = the command's summary line (0.1 s precision)"}
    ab = result["quiet_ab"]
    print(f"quiet: after / before = {ab['wall_after_over_before']} (wall), {ab['loop_after_over_before']} (loop)",
          flush=True)
    result["notes"] = [n for n in result.get("notes", []) if not n.startswith("quiet A/B")] + [
        f"quiet A/B ({args.quiet_ab} alternating pairs, {ab['before_commit']} and {ab['tree_commit']}, alone): whole "
        f"command {ab['before']['median_wall_s']} -> {ab['after']['median_wall_s']} s (x{ab['wall_after_over_before']}), "
        f"loop x{ab['loop_after_over_before']}, CPU {ab['before']['median_cpu_ms_per_img']} -> "
        f"{ab['after']['median_cpu_ms_per_img']} ms/img; per-pair wall ratios {min(ab['pairwise_wall_ratios'])}-"
        f"{max(ab['pairwise_wall_ratios'])}; codes {'the same' if ab['codes_same'] else 'DIFFER'}"]
    write_results(result, path, stamp_load=False)


def judge(q: dict, c: dict, kind: str, cores: int) -> dict:
    """One setting beside one neighbour against quiet (both `summarise`d), and the verdict.

    The cores it got = its CPU per wall second beside the neighbour over the same quiet: what the
    scheduler gave it. Throughput in proportion to those cores = whole-command throughput ratio over
    that share (1/CPU ratio: the same work per CPU second). Good: >= 0.9 of proportional, and CPU per
    image <= 1.5x quiet. The fair share (what a fair scheduler would give it) is shown beside.
    """
    b = {"fair_share": round(fair_share(kind, cores), 3), **c,
         "throughput_ratio": round(q["wall_s"] / c["wall_s"], 3),
         "loop_throughput_ratio": round(q["loop_s"] / c["loop_s"], 3),
         "cpu_per_image_ratio": round(c["cpu_s"] / q["cpu_s"], 3),
         "cores_got_ratio": round((c["cpu_s"] / c["wall_s"]) / (q["cpu_s"] / q["wall_s"]), 3)}
    b["throughput_vs_proportional"] = round(b["throughput_ratio"] / b["cores_got_ratio"], 3)
    b["good_neighbour"] = b["throughput_vs_proportional"] >= 0.9 and b["cpu_per_image_ratio"] <= 1.5
    return b


def tabulate(rows: dict, neighbours: list[str], first: str) -> tuple[list[str], list[list]]:
    """The results table: a row per (setting, neighbour)."""
    cols = ["setting", "neighbour", "quiet loop img/s", "beside loop img/s", "throughput ratio", "cores it got",
            "throughput / proportional", "quiet CPU ms/img", "beside CPU ms/img", "CPU ratio", "fair share",
            "neighbour's cores", "good (>= 0.9 of proportional, CPU <= 1.5x)", f"quiet loop time vs {first}",
            f"codes vs {first}"]
    table = []
    for name, row in rows.items():
        q = row["quiet"]
        for kind in neighbours:
            b = row["beside"][kind]
            table.append([name, kind, q["loop_img_per_s"], b["loop_img_per_s"], b["throughput_ratio"],
                          b["cores_got_ratio"], b["throughput_vs_proportional"], q["cpu_ms_per_img"],
                          b["cpu_ms_per_img"], b["cpu_per_image_ratio"], b["fair_share"], b["neighbour_cores"],
                          "yes" if b["good_neighbour"] else "no", row["quiet_loop_vs_first"],
                          "same" if row["codes_same_as_first"] else "DIFFER"])
    return cols, table


def retable(name: str) -> None:
    """`--retable`: the verdicts and table of an existing results file derived again from its runs
    (nothing re-measured; the file's own header lines and notes are kept)."""
    path = RESULTS / f"{name}.json"
    result = json.loads(path.read_text())
    rows, neighbours = result["settings"], result["neighbours"]
    for row in rows.values():
        for kind in neighbours:
            c = {k: v for k, v in row["beside"][kind].items() if k in row["quiet"]}
            row["beside"][kind] = judge(row["quiet"], c, kind, result["cores"])
    cols, table = tabulate(rows, neighbours, next(iter(rows)))
    result["table"] = {"columns": cols, "rows": table}
    # the verdict's note once, where the file had it (or the fair-share verdict's note it replaced)
    result["notes"] = [NOTE_GOOD if n.startswith("fair share") else n for n in result["notes"]]
    if NOTE_GOOD not in result["notes"]:
        result["notes"].append(NOTE_GOOD)
    header = [ln for ln in path.with_suffix(".txt").read_text().splitlines() if ln.startswith("#")]
    write_results(result, path, header + [" | ".join(cols)] + [" | ".join(str(v) for v in r) for r in table],
                  stamp_load=False)
    print(path.with_suffix(".txt").read_text(), end="")


NOTE_GOOD = ("cores it got = CPU per wall second beside the neighbour / quiet; throughput / proportional = whole-command "
             "throughput ratio / cores it got; good = >= 0.9 of proportional and CPU per image <= 1.5x quiet; fair share "
             "= cores / (cores + N) beside spinN, 0.5 beside a second extract: what a fair scheduler would give it")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", choices=["folder", "wds"], default="folder")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--settings", default="default,passive,spin1000,spin10000,spin30000,kmp,intra1,intra1-passive,workers1")
    ap.add_argument("--neighbours", default="spin2,spin4,extract",
                    help="spinN (N busy processes) and/or extract (the same command in a loop), comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose cnncodes runs (default: this one)")
    ap.add_argument("--before", type=Path, help="a checkout of the commit before a fix: the settings run there")
    ap.add_argument("--quiet-cores", type=float, default=0.3, help="runs wait until the rest of the machine uses fewer")
    ap.add_argument("--max-wait", type=float, default=600, help="longest wait for quiet, s (then it runs anyway, recorded)")
    ap.add_argument("--retries", type=int, default=5, help="runs again when other jobs used more than --quiet-cores meanwhile")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "cnncodes-neighbour")
    ap.add_argument("--name", default="neighbour", help="results file bench/results/NAME.json")
    ap.add_argument("--quiet-ab", type=int, metavar="N", help="only N quiet pairs of --before and --tree (the fix's quiet "
                    "cost), added to the results file")
    ap.add_argument("--retable", action="store_true", help="derive the table of bench/results/NAME.json again from "
                    "its runs (nothing measured)")
    args = ap.parse_args()
    if args.retable:
        return retable(args.name)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill`: the neighbours are stopped on the way out

    result = results_header(args.name)
    cores = os.cpu_count() or 1
    args.dir.mkdir(parents=True, exist_ok=True)
    data = make_input(args.input, args.dir, args.images)
    if args.quiet_ab:
        if not args.before:
            raise SystemExit("--quiet-ab compares --before with --tree: name both")
        return quiet_ab(args, data)
    neighbours = args.neighbours.split(",")
    for kind in neighbours:
        if not (kind == "extract" or re.fullmatch(r"spin\d+", kind)):
            raise SystemExit(f"unknown neighbour {kind!r}: spinN or extract")
    conds = ["quiet", *neighbours]
    lines = [f"# {hardware()}", f"# checkouts: {tree_commit(args.tree)} (tree)" + (f", {tree_commit(args.before)} (before)" if args.before else ""),
             f"# input: {args.images} 72-px JPEGs ({args.input}) at {data}; neighbours: "
             + ", ".join(f"{k} (fair share {fair_share(k, cores):.2f})" for k in neighbours)]
    print("\n".join(lines), flush=True)
    names = args.settings.split(",")
    trees = {name: (args.before or args.tree, setting(name)) for name in names}
    if args.before:
        trees["this tree: default"] = (args.tree, {})
    spins = {name: spin_calibration(tree, spec) for name, (tree, spec) in trees.items() if not (spec.keys() - {"env"})}
    print(f"# idle OpenMP worker, CPU ms per parallel region followed by 10 ms of nothing: {spins}", flush=True)
    runs = {(n, c): [] for n in trees for c in conds}
    discarded: list[dict] = []
    for r in range(args.repeats):
        for name, (tree, spec) in trees.items():
            out = args.dir / "out" / re.sub(r"[^\w.-]", "_", name) / "codes.h5"
            for cond in conds:
                run = measure(args, tree, spec, data, out, cond, discarded, name)
                runs[name, cond].append(run)
                print(f"repeat {r} {name:>20} {cond:>8}: {run['wall_s']:5.1f} s wall, {run['loop_s']:5.1f} s loop, "
                      f"{1000 * run['cpu_s'] / args.images:5.1f} ms CPU/img (neighbour {run['neighbour_cores']:.2f}, "
                      f"others {run['other_cores']:.2f} cores)", flush=True)

    base_codes = runs[names[0], "quiet"][0]["codes"]
    first_quiet = statistics.median(r["loop_s"] for r in runs[names[0], "quiet"])
    rows, table = {}, []
    for name, (tree, spec) in trees.items():
        q = summarise(runs[name, "quiet"], args.images)
        codes = sorted({r["codes"] for c in conds for r in runs[name, c]})
        row = {"tree": str(tree), "spec": spec, "idle_spin_cpu_ms": spins.get(name), "quiet": q,
               "quiet_loop_vs_first": round(q["loop_s"] / first_quiet, 3), "codes": codes,
               "codes_same_as_first": codes == [base_codes], "beside": {}}
        for kind in neighbours:
            c = summarise(runs[name, kind], args.images)
            row["beside"][kind] = judge(q, c, kind, cores)
        rows[name] = row
    cols, table = tabulate(rows, neighbours, names[0])
    lines.append(" | ".join(cols))
    lines += [" | ".join(str(v) for v in row) for row in table]
    print("\n".join(lines[-len(table) - 1:]), flush=True)
    result.update({
        "input": args.input, "images": args.images, "arch": "resnet18", "image_size": 64, "weights": "none",
        "neighbours": neighbours, "repeats": args.repeats, "cores": cores,
        "before": str(args.before) if args.before else None, "before_commit": tree_commit(args.before),
        "tree": str(args.tree), "tree_commit": tree_commit(args.tree), "quiet_cores": args.quiet_cores,
        "idle_spin_cpu_ms": spins, "settings": rows, "discarded_runs": discarded,
        "table": {"columns": cols, "rows": table},
        "notes": ["neighbours in the bench's session (the kernel's autogroup puts them with the extract: shares are per "
                  "thread): spinN = N `while True: pass` processes, extract = the same command to another output in a loop",
                  NOTE_GOOD,
                  "loop = the extraction loop the command reports (its summary line); CPU = the child's user + system time "
                  "(wait4), whole command, start-up included; medians of the repeats",
                  f"runs during which other jobs used more than {args.quiet_cores} cores were run again "
                  f"({len(discarded)} discarded, kept under discarded_runs)"],
    })
    write_results(result, RESULTS / f"{args.name}.json", lines)
    print(f"wrote {RESULTS / f'{args.name}.json'}")


if __name__ == "__main__":
    main()
