"""`audit`: a cache in, the audit folder out (label issues, duplicates and leaks, outliers, pictures, summary)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CnnCodesError
from ..heads.config import HeadConfig
from .config import AuditConfig
from .duplicates import Duplicates, find_duplicates
from .images import Images, load_images
from .labels import RANKED_BY, LabelIssues, cleanlab_functions, find_label_issues
from .neighbours import Neighbours, find_neighbours
from .outliers import Outliers, find_outliers
from .output import DUPLICATES, LABEL_ISSUES, LEAKS, OUTLIERS, check_new_folder, new_folder, write_csv, write_summary
from .pictures import draw_pictures


def audit(cache_path: str | Path, out: str | Path, config: AuditConfig | None = None, head: HeadConfig | None = None,
          *, log: Callable[[str], None] | None = None, **overrides: Any) -> dict:
    """Audit a cache (a file, a sharded store's index, or one made from a CSV manifest) into the new folder `out`.

    `config`: the audit's options (`AuditConfig`); `head`: the head whose out-of-fold probabilities rank the label
    issues (`HeadConfig`: logreg, C by grouped CV, as `fit-head`); `overrides`: fields of either by name
    (`audit(cache, out, near=0.95, clf="svm", device="cpu")`). Returns the summary
    (what summary.json holds). `out` must not exist; it appears whole, or not at all.
    """
    from ..config import with_overrides
    from ..store import Cache

    ours = {f.name for f in dataclasses.fields(AuditConfig)}
    config = with_overrides(AuditConfig, config, {k: v for k, v in overrides.items() if k in ours}, "audit")
    head = with_overrides(HeadConfig, head, {k: v for k, v in overrides.items() if k not in ours}, "audit")
    out = check_new_folder(out)
    log = log or (lambda m: None)
    start, timings = time.perf_counter(), {}
    import torch  # noqa: F401  (imported here to be timed apart: torch, then scikit-learn with cleanlab)

    cleanlab_functions()
    timings["imports"] = time.perf_counter() - start
    with Cache(cache_path) as cache:
        try:
            issues = find_label_issues(cache, head, log)  # first: it says in one line what is wrong with train
        except CnnCodesError as e:  # name the file where the heads' message does not (NaN codes)
            raise (e if str(e).startswith(str(cache.path)) else CnnCodesError(f"{cache.path}: {e}")) from None
        timings["label_issues"] = issues.seconds
        t = time.perf_counter()
        images = load_images(cache, config.data)
        timings["read_codes"] = time.perf_counter() - t
        cache_name = str(cache.path)
    nbrs, raw_nbrs = find_neighbours(images, config.neighbours, config.search, head.device)
    timings["neighbours"] = nbrs.seconds
    t = time.perf_counter()
    dups = find_duplicates(images, nbrs, config.near)
    timings["duplicates"] = time.perf_counter() - t
    outliers = find_outliers(images, raw_nbrs, config.outlier_z)
    with new_folder(Path(out)) as folder:
        write_csv(folder, LABEL_ISSUES, label_rows(images, issues))
        write_csv(folder, DUPLICATES, [(images.paths[p.a], images.splits[p.a], images.paths[p.b], images.splits[p.b],
                                        p.similarity, p.kind) for p in dups.pairs])
        write_csv(folder, LEAKS, [(images.paths[p.a], images.splits[p.a], images.paths[p.b], p.similarity, p.kind)
                                  for p in dups.leaks()])
        write_csv(folder, OUTLIERS, outlier_rows(images, outliers))
        t = time.perf_counter()
        pictures = draw_pictures(folder, images, issues, dups, outliers, config.pictures)
        timings["pictures"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        summary = make_summary(cache_name, config, images, issues, nbrs, dups, outliers, pictures, timings)
        write_summary(folder, summary)
    for line in summary_lines(summary, out):
        log(line)
    return summary


def label_rows(images: Images, issues: LabelIssues) -> list[tuple]:
    """label_issues.csv: the flagged train images, most suspicious first."""
    suggested = issues.suggested()
    name = [images.classes[c] for c in issues.classes]
    return [(images.paths[i], "train", name[issues.labels[i]], name[suggested[i]], float(issues.quality[i]),
             float(issues.probs[i, suggested[i]])) for i in issues.flagged]


def outlier_rows(images: Images, outliers: Outliers) -> list[tuple]:
    return [(images.paths[i], images.splits[i], images.classes[images.labels[i]], images.classes[c],
             float(outliers.score[i]), float(outliers.z[i])) for i, c in zip(outliers.flagged, outliers.nearest_class)]


def make_summary(cache: str, config: AuditConfig, images: Images, issues: LabelIssues, nbrs: Neighbours,
                 dups: Duplicates, outliers: Outliers, pictures: list[str], timings: dict) -> dict:
    """What summary.json holds (docs/formats.md, "Audit folder")."""
    import cleanlab

    kinds = [p.kind for p in dups.pairs]
    leaks = dups.leaks()
    return {
        "cache": cache, "images": images.counts(), "classes": images.classes,
        "files": str(images.root) if images.root is not None else None,
        "head": issues.head,
        "label_issues": {"count": len(issues.flagged), "train_images": len(issues.labels),
                         "method": f"cleanlab {cleanlab.__version__} find_label_issues (prune_by_noise_rate) on "
                                   f"out-of-fold probabilities, ranked by {RANKED_BY}"},
        "duplicates": {"pairs": len(dups.pairs), "exact": kinds.count("exact"), "near": kinds.count("near"),
                       "leak_pairs": sum(p.leak for p in dups.pairs), "near_threshold": config.near,
                       "similarity": "cosine of the plain-view codes centred on the train mean",
                       "exact_check": dups.exact_check, "notes": dups.notes},
        "leaks": {"images": len(leaks), "by_split": _count(images.splits[p.a] for p in leaks)},
        "outliers": {"count": len(outliers.flagged), "threshold_z": config.outlier_z, "neighbours": nbrs.index.shape[1],
                     "train_median": outliers.median, "train_spread": outliers.spread,
                     "score": "mean cosine distance to the nearest neighbours; z = (score - median) / spread over train"},
        "neighbours": {"search": nbrs.method, "k": int(nbrs.index.shape[1]), "notes": nbrs.notes},
        "pictures": pictures,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[str(item)] = out.get(str(item), 0) + 1
    return out


def summary_lines(s: dict, out) -> list[str]:
    """One console line per finding kind, leaks first."""
    d, h, li, o = s["duplicates"], s["head"], s["label_issues"], s["outliers"]
    where = ", ".join(f"{n} {split}" for split, n in s["leaks"]["by_split"].items()) or "none"
    lines = [
        f"leaks: {s['leaks']['images']} held-out image(s) near a train image ({where}) -> {LEAKS} "
        f"(fit-head --exclude {Path(out) / LEAKS} scores val without them)",
        f"duplicates: {d['pairs']} pair(s), {d['exact']} exact, {d['near']} near (cosine >= {d['near_threshold']:g}); "
        f"{s['neighbours']['search']} -> {DUPLICATES}",
        f"label issues: {li['count']} of {li['train_images']} train images flagged (out-of-fold {h['clf']} at "
        f"C={h['C']:g}, {h['out_of_fold']}) -> {LABEL_ISSUES}",
        f"outliers: {o['count']} image(s) with robust z > {o['threshold_z']:g} of the distance to {o['neighbours']} "
        f"neighbours -> {OUTLIERS}",
    ]
    for note in [*d["notes"], *s["neighbours"]["notes"], *h["notes"]]:
        lines.append(f"note: {note}")
    if not s["pictures"]:
        lines.append("note: no pictures: the image files are not known (pass --data DATA)" if s["files"] is None
                     else "note: no pictures (nothing found, or --pictures 0)")
    lines.append(f"wrote {out} in {s['seconds']['total']:.1f} s (exact duplicate check: {d['exact_check']})")
    return lines
