"""`cnncodes audit`, measured: does it find planted label errors and duplicates, how fast, and how the
neighbour search scales.

1. Planted ants/bees (`--part labels`): 5% of the train labels flipped by a fixed seed (files moved to the other
   class folder), a val image recompressed at JPEG quality 85 and resized to 90% copied into train (a leak), a
   train image byte-copied inside train. Extracted with the real MobileNetV2 file, then audited. Precision and
   recall of the flipped images among the top k (k = number flipped) and among the flagged set, side by side
   with cleanlab's `find_label_issues` on scikit-learn `cross_val_predict` probabilities (LogisticRegression,
   5 folds, the cleanlab tutorials' recipe) and with "misclassified out of fold" (the same probabilities'
   argmax differs from the given label; top k: the most confident such). Seed 0 is the headline; --seeds N
   repeats the flip with seeds 0..N-1 (mean). Every planted duplicate must be found with the right kind.
2. The whole command (`--part command`): `cnncodes audit` as a user runs it (start-up, imports, CV, search,
   hashing, pictures), median of --repeats, on the planted ants/bees (~400 codes) and the demo's digits
   (1,797 images, MobileNetV2 codes); and what importing cleanlab costs.
3. The neighbour search (`--part search`): synthetic 2048-d codes (low-rank class structure, 1,000 planted
   near-duplicate pairs at cosine ~0.95), exact blocked matmul and faiss, 10^5 and 10^6 codes: seconds (median
   of --repeats; 10^6 exact is extrapolated, not run: N^2), peak memory beyond the codes, planted pairs found.
4. The threshold (`--part threshold`): the near-duplicate threshold's evidence: on ants/bees, the highest
   cosine between distinct images against that of the planted recompressed copies, MobileNetV2 and ResNet-50.

    python bench/audit_bench.py --part labels --seeds 10 --part command --part threshold   # minutes
    python bench/audit_bench.py --part search                                             # tens of minutes

Writes bench/results/audit.json, audit_command.json, audit_search.json, audit_threshold.json; skips what needs
../shared when it is absent.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HYMENOPTERA, RESULTS, SHARED, results_header, write_results  # noqa: E402

MOBILENET = SHARED / "weights" / "mobilenet_v2-imagenet-features.pth"
RESNET50 = SHARED / "weights" / "resnet50-imagenet-keras.pth"
FLIP_FRACTION = 0.05


# --------------------------------------------------------------------------- the planted dataset


def plant(src: Path, dst: Path, seed: int) -> dict:
    """Copy `src` to `dst`, flip FLIP_FRACTION of the train labels (move the files to the other class folder),
    plant a recompressed, resized val image in train and a byte copy inside train; the truth as a dict."""
    from PIL import Image

    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    train = sorted(p for p in (dst / "train").rglob("*") if p.is_file())
    classes = sorted(d.name for d in (dst / "train").iterdir() if d.is_dir())
    flipped = []
    for i in rng.choice(len(train), size=round(FLIP_FRACTION * len(train)), replace=False):
        p = train[i]
        other = classes[(classes.index(p.parent.name) + 1 + rng.integers(len(classes) - 1)) % len(classes)]
        target = dst / "train" / other / p.name
        p.rename(target)
        flipped.append(target.relative_to(dst).as_posix())
    kept = sorted(set(p.relative_to(dst).as_posix() for p in (dst / "train").rglob("*.jpg")) - set(flipped))
    val = sorted(p for p in (dst / "val").rglob("*.jpg"))
    source = val[rng.integers(len(val))]
    im = Image.open(source).convert("RGB")
    im = im.resize((round(0.9 * im.width), round(0.9 * im.height)), Image.BICUBIC)
    leak = dst / "train" / source.parent.name / f"planted-leak-{source.name}"
    im.save(leak, quality=85)
    original = dst / kept[rng.integers(len(kept))]
    copy = original.with_name(f"planted-copy-{original.name}")
    shutil.copyfile(original, copy)
    rel = lambda p: p.relative_to(dst).as_posix()  # noqa: E731
    return {"flipped": flipped, "leak": (rel(source), rel(leak)), "copy": (rel(original), rel(copy)),
            "train_images": len(train) + 2}


def extract(data: Path, out: Path, arch: str = "mobilenet_v2", weights: Path = MOBILENET) -> Path:
    subprocess.run([sys.executable, "-m", "cnncodes", "extract", str(data), "-o", str(out), "--arch", arch,
                    "--weights", str(weights), "-q"], check=True, capture_output=True)
    return out


# --------------------------------------------------------------------------- 1. label issues


def precision_recall(ranked: np.ndarray, flagged: np.ndarray, truth: np.ndarray) -> dict:
    """Top k (k = truth count) of the ranking, and the flagged set, against the flipped images."""
    k = int(truth.sum())
    top = ranked[:k]
    hit = int(truth[flagged].sum())
    return {"top_k_precision": float(truth[top].mean()), "top_k_recall": float(truth[top].sum() / k),
            "flagged": len(flagged), "flagged_precision": hit / len(flagged) if len(flagged) else None,
            "flagged_recall": hit / k}


def baselines(cache: Path, truth: np.ndarray) -> dict:
    """cleanlab on cross_val_predict probabilities, and misclassified out of fold, on the same codes."""
    import warnings

    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from cnncodes.store import Cache

    with Cache(cache) as c:
        keep = c.views("train") == 0
        x, y = c.features("train")[()][keep], c.labels("train")[keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probs = cross_val_predict(LogisticRegression(max_iter=1000), x, y, cv=5, method="predict_proba")
    ranked = find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    self_conf = probs[np.arange(len(y)), y]
    wrong = np.flatnonzero(probs.argmax(1) != y)
    by_confidence = wrong[np.argsort(-probs[wrong].max(1), kind="stable")]
    rest = np.setdiff1d(np.argsort(self_conf, kind="stable"), by_confidence, assume_unique=True)
    return {"cleanlab on cross_val_predict": precision_recall(np.argsort(self_conf, kind="stable"), ranked, truth),
            "misclassified out of fold": precision_recall(np.r_[by_confidence, rest], wrong, truth)}


def audit_run(cache: Path, data: Path, out: Path) -> tuple[dict, float]:
    """`cnncodes audit` as a user runs it: (summary.json, wall seconds)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cnncodes", "audit", str(cache), "-o", str(out), "--data", str(data)],
                   check=True, capture_output=True, text=True)
    return json.loads((out / "summary.json").read_text()), time.perf_counter() - start


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def label_seed(seed: int, work: Path) -> dict:
    """One planted set: extract, audit, score ours and the baselines, check the planted duplicates."""
    data = work / f"planted-{seed}"
    truth_info = plant(HYMENOPTERA, data, seed)
    cache = extract(data, work / f"planted-{seed}.h5")
    summary, wall = audit_run(cache, data, work / f"audit-{seed}")
    from cnncodes.store import Cache

    with Cache(cache) as c:
        paths = c.paths("train")[c.views("train") == 0]
    truth = np.isin(paths, truth_info["flipped"])
    issues = read_csv(work / f"audit-{seed}" / "label_issues.csv")
    flagged = np.array([int(np.flatnonzero(paths == r["path"])[0]) for r in issues], np.int64)
    ranked = _our_ranking(cache, summary)
    out = {"cnncodes audit": precision_recall(ranked, flagged, truth), **baselines(cache, truth)}
    out["duplicates"] = planted_found(work / f"audit-{seed}", truth_info)
    out["flipped"], out["train_images"], out["wall"], out["summary"] = int(truth.sum()), len(paths), wall, summary
    return out


def _our_ranking(cache: Path, summary: dict) -> np.ndarray:
    """The audit's full ranking (the CSV holds only the flagged): its label-issue step run again through the same
    function, ordered by self-confidence; the C it chose is checked against the command's."""
    from cnncodes.audit.labels import find_label_issues
    from cnncodes.heads.config import HeadConfig
    from cnncodes.store import Cache

    with Cache(cache) as c:
        issues = find_label_issues(c, HeadConfig(device="cpu"))
    assert issues.head["C"] == summary["head"]["C"], (issues.head, summary["head"])
    return np.argsort(issues.quality, kind="stable")


def planted_found(folder: Path, truth: dict) -> dict:
    """Whether duplicates.csv holds the leak (val/train, near) and the byte copy (train/train, exact), leaks.csv
    the val image."""
    rows = read_csv(folder / "duplicates.csv")
    pairs = {frozenset((r["path_a"], r["path_b"])): r for r in rows}
    leak, copy = pairs.get(frozenset(truth["leak"])), pairs.get(frozenset(truth["copy"]))
    leaks = {r["path"] for r in read_csv(folder / "leaks.csv")}
    return {"leak_found": leak is not None and truth["leak"][0] in leaks, "leak_kind": leak and leak["kind"],
            "leak_similarity": leak and float(leak["similarity"]), "leak_first": bool(rows) and rows[0] is leak,
            "copy_found": copy is not None, "copy_kind": copy and copy["kind"], "pairs": len(rows),
            "leaks": len(leaks)}


def part_labels(seeds: int, work: Path) -> dict:
    runs = {}
    for seed in range(seeds):
        runs[seed] = label_seed(seed, work)
        r = runs[seed]
        print(f"seed {seed}: flipped {r['flipped']}/{r['train_images']}; " + "; ".join(
            f"{m} P@k {r[m]['top_k_precision']:.3f} flagged {r[m]['flagged']} (P {_f(r[m]['flagged_precision'])}, "
            f"R {r[m]['flagged_recall']:.3f})" for m in METHODS) + f"; duplicates {r['duplicates']}", flush=True)
    return runs


METHODS = ("cnncodes audit", "cleanlab on cross_val_predict", "misclassified out of fold")


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


# --------------------------------------------------------------------------- 2. the whole command


def part_command(work: Path, repeats: int) -> dict:
    """Median wall of the whole command on the planted ants/bees and on the digits; cleanlab's import."""
    from cnncodes.demo import write_digits

    out = {}
    sets = {"ants/bees planted (seed 0)": (work / "planted-0", work / "planted-0.h5")}
    if not sets["ants/bees planted (seed 0)"][1].exists():
        plant(HYMENOPTERA, sets["ants/bees planted (seed 0)"][0], 0)
        extract(*sets["ants/bees planted (seed 0)"])
    digits = write_digits(work / "digits")
    sets["digits (demo, 1,797 images)"] = (digits, extract(digits, work / "digits.h5"))
    for label, (data, cache) in sets.items():
        walls, summary = [], None
        for r in range(repeats):
            summary, wall = audit_run(cache, data, work / f"cmd-{len(out)}-{r}")
            walls.append(wall)
        codes = sum(summary["images"].values())
        out[label] = {"codes": codes, "wall": statistics.median(walls), "walls": walls, "stages": summary["seconds"],
                      "search": summary["neighbours"]["search"]}
        print(f"{label}: {codes} codes, whole command {statistics.median(walls):.2f} s (median of {repeats}: "
              f"{', '.join(f'{w:.2f}' for w in walls)}); stages {summary['seconds']}", flush=True)
    out["cleanlab import"] = import_cost(repeats)
    print(f"cleanlab import: {out['cleanlab import']}", flush=True)
    return out


def import_cost(repeats: int) -> dict:
    """Seconds to import cleanlab's two modules in a fresh process, alone and after scikit-learn (which the
    heads import anyway), median of `repeats`."""
    def run(code: str) -> float:
        times = []
        for _ in range(repeats):
            p = subprocess.run([sys.executable, "-c", f"import time; t = time.perf_counter(); {code}; "
                                                      f"print(time.perf_counter() - t)"],
                               check=True, capture_output=True, text=True)
            times.append(float(p.stdout.split()[-1]))
        return statistics.median(times)

    pre = "import sklearn.linear_model, sklearn.model_selection; t = time.perf_counter()"
    return {"alone": run("import cleanlab.filter, cleanlab.rank"),
            "after_sklearn": run(f"{pre}; import cleanlab.filter, cleanlab.rank")}


# --------------------------------------------------------------------------- 3. the neighbour search


def synthetic_images(n: int, d: int = 2048, pairs: int = 1000, seed: int = 0):
    """`Images` of n synthetic codes (float32, built in blocks): post-ReLU-like, class structure in a rank-256
    subspace, and `pairs` planted near-duplicates (the second of each pair a noisy copy of the first)."""
    from cnncodes.audit.images import Images

    rng = np.random.default_rng(seed)
    rank, classes = 256, 100
    scales = (1.0 + np.arange(rank)) ** -0.5
    basis = (rng.normal(size=(rank, d)) * (scales / np.sqrt((scales ** 2).sum()))[:, None]).astype(np.float32)
    centers = rng.normal(size=(classes, rank)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    labels = rng.integers(classes, size=n)
    for lo in range(0, n, 50_000):
        hi = min(lo + 50_000, n)
        z = centers[labels[lo:hi]] + rng.normal(size=(hi - lo, rank)).astype(np.float32)
        block = z @ basis + 0.3 * rng.normal(size=(hi - lo, d)).astype(np.float32)
        np.maximum(block + 1.0, 0, out=x[lo:hi])
    first = rng.choice(n // 2, size=pairs, replace=False)
    second = n // 2 + first
    x[second] = x[first] + 0.34 * rng.normal(size=(pairs, d)).astype(np.float32)  # centred cosine ~0.95
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    x -= mean
    length = np.linalg.norm(x, axis=1)
    x /= length[:, None]
    images = Images(np.zeros(n, object), np.full(n, "train", object), labels, x, length, mean, [str(c) for c in range(classes)])
    return images, np.stack([first, second], 1)


def search_once(n: int, method: str, k: int) -> dict:
    """One search in this process (a child per measurement): seconds, and the peak resident memory during the
    search beyond what the process held before it (the codes, the interpreter, torch)."""
    from cnncodes.audit.neighbours import find_neighbours

    images, planted = synthetic_images(n)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident set restarts from here
    base = _status_bytes("VmRSS")
    start = time.perf_counter()
    centred, _ = find_neighbours(images, k, method, "cpu")
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    found = sum(b in set(centred.index[a]) for a, b in planted)
    cos = np.einsum("nd,nd->n", images.codes[planted[:, 0]], images.codes[planted[:, 1]])
    return {"n": n, "method": centred.method, "seconds": seconds, "codes_gib": images.codes.nbytes / 2 ** 30,
            "peak_gib": peak / 2 ** 30, "extra_gib": max(0, peak - base) / 2 ** 30, "planted": len(planted),
            "planted_found": int(found), "planted_cosine_median": float(np.median(cos))}


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: the peak since clear_refs)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def part_search(sizes: list[int], repeats: int, k: int) -> dict:
    out = {}
    for n in sizes:
        for method in ("exact", "faiss"):
            if method == "exact" and n > 100_000:
                continue  # N^2: extrapolated below
            runs = []
            for _ in range(repeats if n <= 100_000 or method == "faiss" else 1):
                p = subprocess.run([sys.executable, __file__, "--search-once", str(n), method, str(k)], check=True,
                                   capture_output=True, text=True)
                runs.append(json.loads(p.stdout.splitlines()[-1]))
            r = runs[-1] | {"seconds": statistics.median(x["seconds"] for x in runs),
                            "runs": [x["seconds"] for x in runs]}
            out[f"{n} {method}"] = r
            print(f"{n:,} codes, {r['method']}: {r['seconds']:.1f} s (median of {len(runs)}), peak {r['peak_gib']:.2f} "
                  f"GiB (codes {r['codes_gib']:.2f}, the search +{r['extra_gib']:.2f}); planted pairs found "
                  f"{r['planted_found']}/{r['planted']} (cosine ~{r['planted_cosine_median']:.3f})", flush=True)
    return out


# --------------------------------------------------------------------------- 4. the threshold


PERTURBATIONS = {  # name -> what is done to a val image before it is copied into train
    "q85 90%": (lambda im: im.resize((round(0.9 * im.width), round(0.9 * im.height)), 3), 85),  # 3: bicubic
    "flip": (lambda im: im.transpose(0), 90),  # 0: left-right (Image.Transpose.FLIP_LEFT_RIGHT)
    "crop 80%": (lambda im: im.crop((im.width // 10, im.height // 10, im.width - im.width // 10,
                                     im.height - im.height // 10)), 90),
    "grayscale": (lambda im: im.convert("L").convert("RGB"), 90),
}


def part_threshold(work: Path) -> dict:
    """The near threshold's evidence: 30 val images copied into train per perturbation (JPEG quality 85 and 90%
    size; a mirror image; the central 80%; grayscale) against every other pair of images."""
    from PIL import Image

    from cnncodes.audit.images import load_images
    from cnncodes.store import Cache

    data = work / "threshold"
    shutil.copytree(HYMENOPTERA, data)
    rng = np.random.default_rng(1)
    val = sorted((data / "val").rglob("*.jpg"))
    pairs = []
    for i in rng.choice(len(val), size=30, replace=False):
        p = val[i]
        for n, (kind, (change, quality)) in enumerate(PERTURBATIONS.items()):
            copy = data / "train" / p.parent.name / f"copy{n}-{p.name}"
            change(Image.open(p).convert("RGB")).save(copy, quality=quality)
            pairs.append((kind, p.relative_to(data).as_posix(), copy.relative_to(data).as_posix()))
    out = {}
    for arch, weights in (("mobilenet_v2", MOBILENET), ("resnet50", RESNET50)):
        if not weights.is_file():
            continue
        with Cache(extract(data, work / f"threshold-{arch}.h5", arch, weights)) as c:
            images = load_images(c)
        index = {p: i for i, p in enumerate(images.paths)}
        for space, z in (("centred", images.codes), ("raw", images.raw_unit(slice(None)))):
            s = z @ z.T
            np.fill_diagonal(s, -np.inf)
            copies = {kind: np.array([s[index[a], index[b]] for k, a, b in pairs if k == kind]) for kind in PERTURBATIONS}
            for _, a, b in pairs:
                s[index[a], index[b]] = s[index[b], index[a]] = -np.inf
            copy_rows = [index[b] for _, _, b in pairs]  # a copy is also near its siblings: not a distinct pair
            s[np.ix_(copy_rows, copy_rows)] = -np.inf
            out[f"{arch} {space}"] = {"distinct_max": float(s.max()), "images": len(images),
                                      "copies": {k: {"min": float(v.min()), "median": float(np.median(v)),
                                                     "found_at_0.90": int((v >= 0.90).sum()), "n": len(v)}
                                                 for k, v in copies.items()}}
            print(f"{arch} {space}: distinct pairs max {s.max():.3f}; " + "; ".join(
                f"{k} min {v.min():.3f} median {np.median(v):.3f}" for k, v in copies.items()), flush=True)
    return out


def part_outlier_space(work: Path) -> dict:
    """Why outliers use raw codes: where ants/bees' "image not found" placeholder ranks among the 398 images by
    the neighbour distance in each cosine space (MobileNetV2 codes, 10 neighbours)."""
    from cnncodes.audit.images import load_images
    from cnncodes.audit.neighbours import find_neighbours
    from cnncodes.audit.outliers import find_outliers
    from cnncodes.store import Cache

    target = "train/ants/imageNotFound.gif"
    with Cache(extract(HYMENOPTERA, work / "plain-mobilenet_v2.h5")) as c:
        images = load_images(c)
    if target not in set(images.paths):
        return {}
    i = int(np.flatnonzero(images.paths == target)[0])
    out = {}
    for space, nbrs in zip(("centred", "raw"), find_neighbours(images, 10, "exact", "cpu")):
        o = find_outliers(images, nbrs, 5.0)
        rank = int(np.flatnonzero(np.argsort(-o.score, kind="stable") == i)[0]) + 1
        out[space] = {"rank": rank, "of": len(images), "z": float(o.z[i]), "flagged": len(o.flagged)}
        print(f"{target} by {space} cosine: rank {rank} of {len(images)}, z {o.z[i]:.1f}", flush=True)
    return out


# --------------------------------------------------------------------------- results


def label_table(runs: dict) -> dict:
    rows = []
    r0 = runs[0]
    for m in METHODS:
        mean = lambda key: float(np.mean([r[m][key] for r in runs.values() if r[m][key] is not None]))  # noqa: E731
        rows.append([m, f"{r0[m]['top_k_precision']:.3f}", f"{r0[m]['flagged']}", _f(r0[m]['flagged_precision']),
                     f"{r0[m]['flagged_recall']:.3f}", f"{mean('top_k_precision'):.3f}", f"{mean('flagged'):.1f}",
                     f"{mean('flagged_precision'):.3f}", f"{mean('flagged_recall'):.3f}"])
    dup = [r["duplicates"] for r in runs.values()]
    head = r0["summary"]["head"]
    notes = [f"{r0['flipped']} of {r0['train_images']} train images flipped (seed 0; k = {r0['flipped']}); top-k "
             f"precision = top-k recall when k = the number flipped. Mean over seeds 0-{len(runs) - 1}.",
             f"cnncodes audit: out-of-fold probabilities of {head['clf']} at C={head['C']:g} (chosen by fit-head's "
             f"grouped CV on the noisy labels), cleanlab find_label_issues, ranked by self-confidence.",
             f"planted duplicates found in {sum(d['leak_found'] and d['copy_found'] for d in dup)} of {len(dup)} runs: "
             f"the leak (val image recompressed q85, resized 90%, in train) as "
             f"{', '.join(sorted({str(d['leak_kind']) for d in dup}))} at cosine "
             f"{min(d['leak_similarity'] or 0 for d in dup):.3f}-{max(d['leak_similarity'] or 0 for d in dup):.3f}, "
             f"listed first in {sum(d['leak_first'] for d in dup)}; the byte copy as "
             f"{', '.join(sorted({str(d['copy_kind']) for d in dup}))}."]
    columns = ["method", "P@k (seed 0)", "flagged", "flagged P", "flagged R", f"P@k (mean of {len(runs)})",
               "flagged (mean)", "flagged P (mean)", "flagged R (mean)"]
    return {"table": {"columns": columns, "rows": rows}, "notes": notes}


def command_table(command: dict) -> dict:
    rows, notes = [], []
    for label, c in command.items():
        if label == "cleanlab import":
            notes.append(f"importing cleanlab.filter and cleanlab.rank in a fresh process: {c['alone']:.2f} s alone, "
                         f"{c['after_sklearn']:.2f} s after scikit-learn (which the heads import anyway)")
            continue
        st = c["stages"]
        rows.append([label, c["codes"], f"{c['wall']:.2f}", ", ".join(f"{w:.2f}" for w in c["walls"]),
                     f"{st['imports']:.2f}", f"{st['label_issues']:.2f}", f"{st['neighbours']:.2f}",
                     f"{st['duplicates']:.2f}", f"{st['pictures']:.2f}", f"{st['total']:.2f}"])
    notes.append("wall: the whole `cnncodes audit CACHE -o DIR --data DATA` command as a user runs it (start-up, "
                 "imports, C search, out-of-fold fits, neighbour search, hashing every file, pictures), median; the "
                 "stages (seconds, from summary.json) are the last run's, inside the command; target <= 10 s on 1k codes")
    return {"table": {"columns": ["set", "codes", "wall s (median)", "runs", "imports", "label issues", "neighbours",
                                  "duplicates (hashing)", "pictures", "in-command total"], "rows": rows},
            "notes": notes}


def search_table(search: dict) -> dict:
    rows = [[f"{r['n']:,}", r["method"], f"{r['seconds']:.1f}", f"{r['codes_gib']:.2f}", f"{r['extra_gib']:.2f}",
             f"{r['planted_found']}/{r['planted']}"] for r in search.values()]
    notes = [f"median of {len(r['runs'])} runs for {key}" for key, r in search.items()]
    exact = {r["n"]: r for r in search.values() if r["method"].startswith("exact")}
    if exact:
        n, r = max(exact.items())
        notes.append(f"exact at 1,000,000 codes not run: (10^6 / {n:,})^2 x {r['seconds']:.0f} s = "
                     f"{r['seconds'] * (1e6 / n) ** 2 / 3600:.1f} h extrapolated")
    return {"table": {"columns": ["codes (2048-d)", "search", "seconds", "codes GiB", "search peak beyond codes GiB",
                                  "planted pairs found"], "rows": rows}, "notes": notes}


def header(bench: str) -> dict:
    """`results_header`, plus the files that differed from the recorded commit when the bench ran (git status):
    a result measured on a tree with uncommitted changes says so."""
    from common import ROOT

    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                            text=True).stdout.splitlines()
    changed = [line.strip() for line in status if not line[3:].startswith("bench/results/")]  # results: our output
    return results_header(bench) | {"uncommitted": changed}


def save(result: dict, name: str) -> None:
    """Write a results file; files that differed from the commit when it ran are said in its notes too."""
    if result.get("uncommitted"):
        result.setdefault("notes", []).append("measured with uncommitted changes (git status): "
                                              + "; ".join(result["uncommitted"]))
    write_results(result, RESULTS / name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", action="append", choices=("labels", "command", "search", "threshold"))
    ap.add_argument("--seeds", type=int, default=10, help="label flips with seeds 0..N-1 (seed 0 is the headline)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per timing (the median is reported)")
    ap.add_argument("--sizes", default="100000,1000000", help="search: code counts")
    ap.add_argument("--neighbours", type=int, default=10)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder [default: a temporary one]")
    ap.add_argument("--search-once", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.search_once:
        n, method, k = args.search_once
        print(json.dumps(search_once(int(n), method, int(k))))
        return 0
    parts = args.part or ["labels", "command", "threshold"]
    needs_shared = {"labels", "command", "threshold"} & set(parts)
    if needs_shared and not (HYMENOPTERA.is_dir() and MOBILENET.is_file()):
        print(f"# skipping {', '.join(sorted(needs_shared))}: {HYMENOPTERA} or {MOBILENET} is absent", flush=True)
        parts = [p for p in parts if p not in needs_shared]
    work = Path(tempfile.mkdtemp(prefix="cnncodes-audit-bench-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    if "labels" in parts:
        result = header("audit")
        runs = part_labels(args.seeds, work)
        result |= label_table(runs) | {"runs": {s: {k: v for k, v in r.items() if k != "summary"}
                                                for s, r in runs.items()}}
        save(result, "audit.json")
    if "command" in parts:
        result = header("audit_command")
        command = part_command(work, args.repeats)
        result |= command_table(command) | {"runs": command}
        save(result, "audit_command.json")
    if "threshold" in parts:
        result = header("audit_threshold")
        t, o = part_threshold(work), part_outlier_space(work)
        notes = ["ants/bees train + val with 30 val images copied into train per perturbation: recompressed at JPEG "
                 "quality 85 and resized to 90%; mirrored; the central 80%; grayscale (the others saved at quality 90). "
                 "Each cell: the lowest cosine between an image and its copy (median; copies at or above 0.90). "
                 "'distinct' = every other pair of images (copies of one image among themselves excluded). "
                 "The audit's default --near is 0.90 on centred codes."]
        notes += [f"outliers: ants/bees' train/ants/imageNotFound.gif ranks {v['rank']} of {v['of']} by the mean "
                  f"{space} cosine distance to 10 neighbours (robust z {v['z']:.1f}; {v['flagged']} image(s) over z 5)"
                  for space, v in o.items()]
        result |= {"spaces": t, "outlier_space": o, "notes": notes,
                   "table": {"columns": ["codes", "distinct pairs: max", *PERTURBATIONS],
                             "rows": [[k, f"{v['distinct_max']:.3f}", *(
                                 f"{c['min']:.3f} ({c['median']:.3f}; {c['found_at_0.90']}/{c['n']})"
                                 for c in v["copies"].values())] for k, v in t.items()]}}
        save(result, "audit_threshold.json")
    if "search" in parts:
        result = header("audit_search")
        search = part_search([int(s) for s in args.sizes.split(",")], args.repeats, args.neighbours)
        result |= search_table(search) | {"runs": search}
        save(result, "audit_search.json")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
