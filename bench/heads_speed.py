"""fit-head speed with C chosen by grouped CV, against the plain scikit-learn recipe, in one run.

For each code set: every head (`fit_head(..., C="auto")`: grouped 5-fold CV on train, or a
held-out tenth above 50k codes; then the final fit), and the reference recipe,
`GridSearchCV(make_pipeline(StandardScaler(), LinearSVC() | LogisticRegression()))` over the same
C grid and the very same folds (`cv_folds`), refit on all of train. Median of --repeats runs;
CV accuracy (per image, train only) and val accuracy beside each time. Nothing is chosen on val.

Code sets: synthetic 1,000 x 2048 codes x 12 classes (`write_synthetic_cache(rank=256)`:
post-ReLU-like, non-negative, class structure in a decaying low-rank subspace like real codes),
with --large also 100,000 x 2048 x 12, and real codes of the real ResNet-50 file: ants/bees (245
train images) and the demo's digits (1,437 train images, 10 classes, `--preprocess-like
IMAGENET1K_V1`), each extracted once into --cache-dir (the digits take minutes on 2 CPU cores);
skipped when ../shared is absent.

Real codes also get "cmd wall": the whole `cnncodes fit-head CACHE --clf X` command as a user runs
it (start-up, loading, C search, final fit, report), median of --repeats; the target for choosing
among many candidates is <= 10 s on real codes of 1-2k images.

    python bench/heads_speed.py            # ~minutes on 2 idle cores
    python bench/heads_speed.py --large    # + 100k codes (slow: the svm reference alone is many minutes)

Writes bench/results/heads_speed.json and .txt. "wall" is elapsed time, "cpu" the process's CPU
time (all threads): on a shared machine the load average (printed) inflates wall, not cpu.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HYMENOPTERA, RESNET50_KERAS, ROOT, results_header, write_results  # noqa: E402

CLFS = ("svm", "logreg", "linear", "linear-svm")
REFERENCE_OF = {"svm": "LinearSVC", "logreg": "LogisticRegression"}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


WAIT_LOAD: float | None = None  # --wait-load: the 1-min load average each timed run waits to fall below
LOADS: list[float] = []  # the load average as each timed run started


def settle() -> None:
    """Wait (up to 30 minutes) until the 1-min load average is below WAIT_LOAD; record it as the run starts."""
    if WAIT_LOAD is not None:
        deadline = time.monotonic() + 1800
        while os.getloadavg()[0] >= WAIT_LOAD and time.monotonic() < deadline:
            time.sleep(10)
    LOADS.append(round(os.getloadavg()[0], 2))


def measure(fn, repeats: int) -> dict:
    """Median wall and CPU seconds of `fn()` over `repeats` runs, and the last run's result."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        settle()
        w, c = time.perf_counter(), cpu_seconds()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(cpu_seconds() - c)
    return {"wall_s": round(statistics.median(walls), 2), "cpu_s": round(statistics.median(cpus), 2),
            "walls": [round(w, 2) for w in walls], **out}


def ours(cache: Path, clf: str) -> dict:
    from cnncodes.heads import fit_head

    head, report = fit_head(cache, clf, "auto", device="cpu")
    sel = report["selection"]
    return {"C": head.C, "cv": sel["cv_score"], "val": report["splits"]["val"]["accuracy"],
            "Cs_tried": len(sel["cv_scores"]), "stopped_early": sel["stopped_early"], "notes": sel["notes"]}


def reference(cache: Path, name: str) -> dict:
    """StandardScaler + GridSearchCV(LinearSVC | LogisticRegression) on our folds, plain view per image."""
    from joblib import parallel_backend
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from cnncodes.runtime import available_cores
    from cnncodes.heads import C_GRID, cv_folds, load_train
    from cnncodes.store import Cache

    with Cache(cache) as c:
        data = load_train(c, in_memory=True)
        x = c.features("train")[()]
        xv, yv, vv = c.features("val")[()], c.labels("val"), c.views("val")
        fold, n_folds, _ = cv_folds(data, 5, seed=0)
    plain = data.views == 0  # the reference scores rows; our caches here hold one view per image
    splits = [(np.flatnonzero(fold != f), np.flatnonzero((fold == f) & plain)) for f in range(n_folds)]
    est = LinearSVC() if name == "LinearSVC" else LogisticRegression(max_iter=1000)
    key = type(est).__name__.lower() + "__C"
    search = GridSearchCV(make_pipeline(StandardScaler(), est), {key: list(C_GRID)}, cv=splits, n_jobs=available_cores())
    with warnings.catch_warnings(), parallel_backend("threading"):  # threads: CPU time stays in this process
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(x, data.y)
    classes = data.classes  # cache class index of each label in data.y
    val = float((classes[search.predict(xv[vv == 0])] == yv[vv == 0]).mean())
    return {"C": search.best_params_[key], "cv": float(search.best_score_), "val": val, "Cs_tried": len(C_GRID)}


def ants_bees(cache_dir: Path, existing: bool = False) -> Path | None:
    out = cache_dir / "heads-speed-hymenoptera-resnet50-bf16.h5"
    if existing:
        return _existing(out)
    if not (HYMENOPTERA.is_dir() and RESNET50_KERAS.is_file()):
        print(f"# skipping ants/bees: {HYMENOPTERA} or {RESNET50_KERAS} is absent", flush=True)
        return None
    from cnncodes.extract import extract

    # IMAGENET1K_V1's 256/224 preprocessing: these weights are of that era (DEFAULT's 232 is V2's recipe)
    r = extract(HYMENOPTERA, out, arch="resnet50", weights=str(RESNET50_KERAS), precision="bf16",
                preprocess_like="IMAGENET1K_V1", progress=False, log=lambda m: None)
    print(f"# {out}: {'up to date' if r.up_to_date else f'extracted in {r.seconds:.0f} s'}", flush=True)
    return out


def _existing(path: Path) -> Path | None:
    """--existing: a cache extracted before (by this or an earlier cnncodes), timed as it is, not re-extracted."""
    if path.exists():
        print(f"# {path}: used as it is (--existing)", flush=True)
        return path
    print(f"# skipping {path.name}: absent (--existing extracts nothing)", flush=True)
    return None


def digits_real(cache_dir: Path, existing: bool = False) -> Path | None:
    """The demo's digits (1,437 train, 360 val images) through the real ResNet-50 file, fp32."""
    if existing:
        return _existing(cache_dir / "heads-speed-digits-resnet50.h5")
    if not RESNET50_KERAS.is_file():
        print(f"# skipping digits: {RESNET50_KERAS} is absent", flush=True)
        return None
    from cnncodes.demo import write_digits
    from cnncodes.extract import extract

    data = write_digits(cache_dir / "heads-speed-digits")
    out = cache_dir / "heads-speed-digits-resnet50.h5"
    r = extract(data, out, arch="resnet50", weights=str(RESNET50_KERAS), preprocess_like="IMAGENET1K_V1",
                progress=False, log=lambda m: None)
    print(f"# {out}: {'up to date' if r.up_to_date else f'extracted in {r.seconds:.0f} s'}", flush=True)
    return out


def command_times(cache: Path, clf: str, repeats: int, tree: Path = ROOT) -> tuple[float, float]:
    """Median wall and CPU seconds (the child's user + system, all threads) of the whole `cnncodes fit-head` command
    in a fresh process (start-up included), run from the checkout `tree` (another commit's, for before/after)."""
    import subprocess

    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            settle()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            w = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cnncodes", "fit-head", str(cache), "-o", f"{tmp}/head.h5",
                            "--clf", clf, "--device", "cpu"], check=True, capture_output=True, cwd=tree,
                           env={**os.environ, "PYTHONPATH": str(tree)})
            walls.append(time.perf_counter() - w)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return round(statistics.median(walls), 2), round(statistics.median(cpus), 2)


def synthetic(cache_dir: Path, n: int) -> Path:
    from cnncodes.testing import write_synthetic_cache

    out = cache_dir / f"heads-speed-synthetic-{n}x2048x12.h5"
    if not out.exists():
        write_synthetic_cache(out, {"train": n, "val": max(500, n // 50)}, dim=2048, n_classes=12, separation=6.0,
                              rank=256)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="also 100,000 x 2048 synthetic codes (slow)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clfs", default=",".join(CLFS))
    ap.add_argument("--no-reference", action="store_true", help="skip the scikit-learn GridSearchCV reference")
    ap.add_argument("--no-digits", action="store_true", help="skip the real-code digits set (minutes to extract once)")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "heads_speed.json")
    ap.add_argument("--before", type=Path, help="a checkout of an earlier commit (git worktree): its whole fit-head "
                                                "command is timed beside this one's, in the same run")
    ap.add_argument("--wait-load", type=float, help="start each timed run only once the 1-min load average is below "
                                                    "this (e.g. 1.3: this process's own run keeps it near 1); "
                                                    "each run's starting load is recorded")
    ap.add_argument("--existing", action="store_true",
                    help="time the real-code caches already in --cache-dir as they are (no extraction): an earlier "
                         "commit (--before) reads the one-file caches that this one no longer extends")
    args = ap.parse_args()
    global WAIT_LOAD
    WAIT_LOAD = args.wait_load
    from cnncodes.runtime import available_cores

    # The header (load average before) first: preparing the caches below (an extraction, a synthetic
    # write) loads the machine itself and must not be read as other jobs' load.
    result = {**results_header("heads_speed"), "available_cores": available_cores(), "repeats": args.repeats,
              "wait_load": WAIT_LOAD, "rows": []}
    if args.before:
        import subprocess

        result["before_commit"] = subprocess.run(["git", "-C", str(args.before), "rev-parse", "--short=12", "HEAD"],
                                                 capture_output=True, text=True).stdout.strip()
    sets, real_sets = {}, set()
    real = ants_bees(args.cache_dir, args.existing)
    if real:
        sets["ants/bees resnet50 bf16"] = real
    digits = None if args.no_digits else digits_real(args.cache_dir, args.existing)
    if digits:
        sets["digits resnet50 fp32"] = digits
    real_sets = {label for label, path in sets.items() if path in (real, digits)}
    sets["synthetic 1000x2048x12"] = synthetic(args.cache_dir, 1000)
    if args.large:
        sets["synthetic 100000x2048x12"] = synthetic(args.cache_dir, 100_000)
    lines = [f"{'codes':<26} {'head':<28} {'wall s':>7} {'cpu s':>7} {'cmd s':>7} {'cmd cpu':>7} {'C':>7} {'CV acc':>7} "
             f"{'val acc':>7}  C tried"]
    print(lines[0], flush=True)
    for label, cache in sets.items():
        runs = [(clf, lambda c=clf: ours(cache, c)) for clf in args.clfs.split(",")]
        if not args.no_reference:
            runs += [(f"reference GridSearchCV({n})", lambda n=n: reference(cache, n)) for n in REFERENCE_OF.values()]
        for head, fn in runs:
            LOADS.clear()
            r = {"codes": label, "head": head, "loadavg": os.getloadavg()[0], **measure(fn, args.repeats)}
            if label in real_sets and head in CLFS:
                r["command_wall_s"], r["command_cpu_s"] = command_times(cache, head, args.repeats)
                if args.before:  # the same command from the earlier checkout, in the same run: like for like
                    r["before_command_wall_s"], r["before_command_cpu_s"] = command_times(cache, head, args.repeats,
                                                                                        args.before)
            r["loads_at_start"] = list(LOADS)
            result["rows"].append(r)
            cmd = (f"{r['command_wall_s']:>7.1f} {r['command_cpu_s']:>7.1f}" if "command_wall_s" in r else f"{'':>15}")
            if "before_command_wall_s" in r:
                cmd += f" (before {r['before_command_wall_s']:.1f} / {r['before_command_cpu_s']:.1f})"
            line = (f"{label:<26} {head:<28} {r['wall_s']:>7.1f} {r['cpu_s']:>7.1f} {cmd} {r['C']:>7.0e} {r['cv']:>7.4f} "
                    f"{r['val']:>7.4f}  {r['Cs_tried']}" + (" (stopped early)" if r.get("stopped_early") else ""))
            lines.append(line)
            print(line, flush=True)
    cores = result["machine"]["cores"]
    starts = [v for r in result["rows"] for v in r["loads_at_start"]]
    footer = (f"# {cores} cores ({result['available_cores']} available), load average before "
              f"{result['load_before'][0]:.1f}, after {os.getloadavg()[0]:.1f}, at each timed run's start "
              f"{min(starts):.2f}-{max(starts):.2f}" + (f" (each waited for < {WAIT_LOAD:g})" if WAIT_LOAD else "")
              + f"; median of {args.repeats}")
    lines.append(footer)
    print(footer)
    before = [f"command wall / CPU s at {result['before_commit']}"] if args.before else []
    result["table"] = {"columns": ["codes", "head", "CPU s", "wall s", "command wall s", "command CPU s", *before, "C",
                                   "CV acc", "val acc", "C values tried"],
                       "rows": [[r["codes"], r["head"], f"{r['cpu_s']:.1f}", f"{r['wall_s']:.1f}",
                                 f"{r['command_wall_s']:.1f}" if "command_wall_s" in r else "",
                                 f"{r['command_cpu_s']:.1f}" if "command_cpu_s" in r else "",
                                 *([f"{r['before_command_wall_s']:.1f} / {r['before_command_cpu_s']:.1f}"
                                    if "before_command_wall_s" in r else ""] if args.before else []),
                                 f"{r['C']:.0e}",
                                 f"{r['cv']:.4f}", f"{r['val']:.4f}",
                                 f"{r['Cs_tried']}" + (" (stopped early)" if r.get("stopped_early") else "")]
                                for r in result["rows"]]}
    result["notes"] = [f"fit time with C chosen by grouped 5-fold CV on train (the same folds for the reference), "
                       f"then the final fit; median of {args.repeats}; CPU s = process CPU time (all threads); "
                       "val accuracy is reported, never used to choose"]
    write_results(result, args.out, lines)
    print(f"# wrote {args.out} and {args.out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
