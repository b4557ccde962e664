"""Choosing among caches: several caches of the same images (other backbones, layers, preprocessing or
precision), each with one or more head types, scored by the same grouped cross-validation on train.

caches -> `check_same_images` (paths, labels, splits, classes; no codes read) -> train codes of each ->
one set of folds (`shared_folds`, made once from the images and labels) -> a `Candidate` per (cache or
fusion, clf) with its C path -> the pick (best CV accuracy; ties to the smaller code, then the order
given) -> the chosen one refitted on all of train -> evaluated once on val/test.

Why only the chosen one is evaluated: choosing among candidates by their val accuracy is choosing on
the evaluation data, and the winner's val figure is then biased upwards. `show_all_val` evaluates the
others too (after the choice), and the report labels those figures OPTIMISTIC.

Fusion (`concat`): the train codes of every cache, each standardised with its own train statistics
(the standardiser of a single-cache head), side by side; a linear head on them is one more candidate.
A fused head needs every backbone to run: `predict`, `export` and `--init-head` refuse it
(`refuse_fused`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CnnCodesError

if TYPE_CHECKING:
    from .codes import TrainSet
    from .config import HeadConfig
    from .format import LinearHead
    from .selection import Folds, Selection

FUSION = "concat"
OPTIMISTIC = ("OPTIMISTIC: candidates not chosen by CV; picking the best of them by these figures would be choosing "
              "on the evaluation data: only the chosen candidate's val/test accuracy is an honest estimate")


def refuse_fused(meta: dict, what: str) -> None:
    """One clear line for the commands that run a backbone: a fused head needs several."""
    fused = meta.get("fused")
    if fused:
        names = " + ".join(m.get("arch", "?") for m in fused)
        raise CnnCodesError(f"head is a fusion of {len(fused)} backbones' codes ({names}); {what} runs one backbone: "
                            f"refit on one cache (`cnncodes fit-head CACHE -o HEAD.h5`, or fit-head with several "
                            f"caches without --concat), or extract each backbone and score the concatenated codes")


@dataclass
class Candidate:
    """One competitor: a head type on a cache's codes (or on the fusion), with its C path on the shared folds."""

    name: str
    clf: str
    dim: int
    members: tuple[int, ...]  # the caches whose codes it uses
    selection: Selection
    fit_seconds: float
    chosen: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} {self.clf}"

    @property
    def score(self) -> float:
        return float(self.selection.score)

    @property
    def fused(self) -> bool:
        return len(self.members) > 1

    def source(self, caches: Sequence):
        """Where its codes are read: its one cache, or its members' side by side (`FusedCache`)."""
        return FusedCache([caches[i] for i in self.members]) if self.fused else caches[self.members[0]]

    def to_dict(self) -> dict:
        s = self.selection
        return {"name": self.name, "clf": self.clf, "code_dim": self.dim, "C": s.C, "cv_score": s.score,
                "grid": s.grid, "cv_scores": s.scores, "fit_seconds": round(self.fit_seconds, 3),
                "stopped_early": s.stopped, "notes": sorted(set(s.notes)), "chosen": self.chosen,
                "fused": self.fused}


# --------------------------------------------------------------------------- the caches agree


def cache_names(paths: Sequence[Path]) -> list[str]:
    """Short names for the report: file stems, or the paths as given where stems collide."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def _plain_images(cache, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Paths and labels of a split's images (their plain view), in the cache's order."""
    plain = cache.views(split) == 0
    return cache.paths(split)[plain], cache.labels(split)[plain]


def check_same_images(caches: Sequence) -> list[dict[str, np.ndarray]]:
    """Refuse caches that are one file, hold the same codes, lack train, or differ in classes, splits,
    images or labels (one CnnCodesError naming the first difference). Reads paths and labels only.

    Returns per cache {split: position of each of its images in the first cache's image order}.
    """
    ref = caches[0]
    for c in caches:
        if "train" not in c.splits:
            raise CnnCodesError(f"{c.path}: no 'train' split (splits: {', '.join(c.splits) or 'none'}); every cache "
                                f"must hold the train images the candidates are scored on")
    for i, a in enumerate(caches):
        for b in caches[i + 1:]:
            if os.path.samefile(a.path, b.path):
                raise CnnCodesError(f"{a.path} and {b.path} are the same file; pass each cache once")
            if a.config == b.config:
                raise CnnCodesError(f"{a.path} and {b.path} hold the same codes (same arch, weights, preprocessing, "
                                    f"precision, layers): pass caches that differ, one per backbone or setting")
    positions = [dict() for _ in caches]
    for j, c in enumerate(caches):
        if c.classes != ref.classes:
            raise CnnCodesError(_class_difference(ref, c))
        if sorted(c.splits) != sorted(ref.splits):
            raise CnnCodesError(f"{c.path}: splits {', '.join(sorted(c.splits))}, but {ref.path} has "
                                f"{', '.join(sorted(ref.splits))}; extract every cache from the same DATA")
        for split in ref.splits:
            positions[j][split] = _match_images(ref, c, split)
    return positions


def _class_difference(ref, c) -> str:
    for k, (x, y) in enumerate(zip(ref.classes, c.classes)):
        if x != y:
            return (f"{c.path}: class {k} is '{y}', but '{x}' in {ref.path}; the caches must hold the same classes: "
                    f"extract every cache from the same DATA")
    return (f"{c.path}: {len(c.classes)} classes, but {ref.path} has {len(ref.classes)}; the caches must hold the "
            f"same classes: extract every cache from the same DATA")


def _match_images(ref, c, split: str) -> np.ndarray:
    """Position in `ref` of each image of `c` (same set of images, same labels), or one error line."""
    paths_r, labels_r = _plain_images(ref, split)
    paths_c, labels_c = _plain_images(c, split)
    if len(paths_r) == len(paths_c) and np.array_equal(paths_r, paths_c):
        pos = np.arange(len(paths_r))
    else:
        index = {p: i for i, p in enumerate(paths_r)}
        missing = [p for p in paths_c if p not in index]
        if missing or len(paths_c) != len(paths_r):
            extra = sorted(set(paths_r) - set(paths_c))
            which = (f"'{missing[0]}' is in it but not in {ref.path}" if missing
                     else f"'{extra[0]}' is in {ref.path} but not in it")
            raise CnnCodesError(f"{c.path}: {split} holds {len(paths_c)} images, {ref.path} {len(paths_r)}; first "
                                f"difference: {which}; the caches must hold the same images: extract every cache from "
                                f"the same DATA (rerun extract to add new images)")
        pos = np.array([index[p] for p in paths_c], np.int64)
    bad = np.flatnonzero(labels_r[pos] != labels_c)
    if len(bad):
        i = bad[0]
        raise CnnCodesError(f"{c.path}: {split} image '{paths_c[i]}' is labelled '{c.classes[labels_c[i]]}', but "
                            f"'{ref.classes[labels_r[pos[i]]]}' in {ref.path}; extract every cache from the same DATA")
    return pos


# --------------------------------------------------------------------------- one set of folds


def shared_folds(trains: Sequence[TrainSet], train_pos: Sequence[np.ndarray], config: HeadConfig) -> list[Folds]:
    """The CV folds, made once from the first cache's train images and labels, as fold ids per row of each
    cache (all views of an image in its image's fold): every candidate is scored on the same images."""
    from .selection import cv_folds

    fold, n_folds, strategy = cv_folds(trains[0], config.folds, config.seed)
    per_image = np.empty(len(np.unique(trains[0].groups)), np.int64)
    per_image[trains[0].groups] = fold  # image ids are 0..n-1 in the cache's image order
    return [(per_image[pos[t.groups]], n_folds, strategy + ", the same folds for every candidate")
            for t, pos in zip(trains, train_pos)]


def fused_train(trains: Sequence[TrainSet]) -> TrainSet:
    """The caches' standardised train codes side by side (rows aligned: `check_fusable`)."""
    from .codes import TrainSet

    ref = trains[0]
    return TrainSet(np.hstack([t.features for t in trains]), ref.y, ref.groups, ref.views,
                    np.concatenate([t.mean for t in trains]), np.concatenate([t.scale for t in trains]), ref.classes)


def check_fusable(caches: Sequence) -> None:
    """--concat joins codes row by row: every cache must store the same rows (images, views) in the same order."""
    ref = caches[0]
    for c in caches[1:]:
        for split in ref.splits:
            if not (np.array_equal(c.paths(split), ref.paths(split)) and np.array_equal(c.views(split), ref.views(split))):
                raise CnnCodesError(f"{c.path}: --concat needs the same rows in every cache, but its {split} rows (images "
                                    f"or views per image) differ from {ref.path}'s; extract the caches with the same "
                                    f"--views/--eval-views, or drop --concat")


class FusedCache:
    """The read side of a `Cache` that `report.evaluate_split` uses, on the caches' codes side by side."""

    def __init__(self, caches: Sequence):
        self.caches, self.path = list(caches), Path("+".join(str(c.path) for c in caches))
        self.classes, self.splits = caches[0].classes, caches[0].splits

    def features(self, split: str) -> np.ndarray:
        return np.hstack([c.features(split)[()].astype(np.float32, copy=False) for c in self.caches])

    def labels(self, split: str) -> np.ndarray:
        return self.caches[0].labels(split)

    def views(self, split: str) -> np.ndarray:
        return self.caches[0].views(split)

    def require_split(self, split: str):
        return self.caches[0].require_split(split)


# --------------------------------------------------------------------------- scoring and choosing


def score_candidates(names: Sequence[str], trains: Sequence[TrainSet], folds: Sequence[Folds], clfs: Sequence[str],
                     config: HeadConfig, device, concat: bool, log: Callable[[str], None]) -> list[Candidate]:
    """Every (cache, clf), and with `concat` (fusion, clf), cross-validated on the shared folds; no refit."""
    import torch  # noqa: F401

    from .selection import fit_linear

    sources = [(n, (i,), t, f) for i, (n, t, f) in enumerate(zip(names, trains, folds))]
    if concat:
        sources.append((f"{FUSION}({'+'.join(names)})", tuple(range(len(trains))), fused_train(trains), folds[0]))
    out = []
    for name, members, data, fold in sources:
        for clf in clfs:
            start = time.perf_counter()
            _, _, sel = fit_linear(data, _cv_config(config, clf), device, folds=fold, refit=False)
            cand = Candidate(name, clf, int(data.features.shape[1]), members, sel, time.perf_counter() - start)
            log(f"{cand.label}: CV accuracy {cand.score:.4f} at C={sel.C:g} ({cand.dim}-d codes, {cand.fit_seconds:.1f} s)")
            out.append(cand)
    return out


def _cv_config(config: HeadConfig, clf: str) -> HeadConfig:
    """A fixed --C is still cross-validated here (a one-value grid): the CV accuracy ranks the candidates."""
    fixed = config.fixed_C
    return dataclasses.replace(config, clf=clf, C="auto", grid=(fixed,) if fixed is not None else config.grid)


def choose(candidates: list[Candidate]) -> Candidate:
    """Best mean CV accuracy; ties go to the smaller code (cheaper to run), then to the order given."""
    best = max(c.score for c in candidates)
    tied = [c for c in candidates if c.score >= best - 1e-12]
    pick = min(tied, key=lambda c: (c.dim, candidates.index(c)))
    pick.chosen = True
    return pick


# --------------------------------------------------------------------------- the whole call


def fit_head_multi(cache_paths: Sequence[str | Path], clfs: Sequence[str] | None = None, *,
                   config: HeadConfig | None = None, concat: bool = False, show_all_val: bool = False,
                   log: Callable[[str], None] | None = None) -> tuple[LinearHead, dict]:
    """Choose among caches (and head types) by grouped CV on train, refit the winner, evaluate it once.

    Returns the chosen head and a JSON-friendly report: every candidate's CV accuracy, code dim and
    fit time; the choice; val/test accuracy of the chosen head only (`show_all_val`: the others'
    too, under "optimistic"). Held-out codes are read only after the choice.
    """
    from contextlib import ExitStack

    from ..runtime import resolve_device
    from ..store import Cache
    from .config import HeadConfig

    config = config or HeadConfig()
    clfs = list(clfs or [config.clf])
    for clf in clfs:
        dataclasses.replace(config, clf=clf)  # validated: an unknown name is one line
    paths = [Path(p) for p in cache_paths]
    if len(paths) < 2 and not (len(clfs) > 1 and not concat):
        raise CnnCodesError("choosing among candidates needs at least two caches (or one cache with several --clf)"
                            + ("; --concat joins two or more caches" if concat else ""))
    log = log or (lambda m: None)
    dev = resolve_device(config.device)
    with ExitStack() as stack:
        caches = [stack.enter_context(Cache(p)) for p in paths]
        positions = check_same_images(caches)
        if concat:
            check_fusable(caches)
        start = time.perf_counter()
        trains = _load_trains(caches, clfs, concat, config.folds, log)
        ref = caches[0]
        heldout = [s for s in ref.splits if s != "train"]
        unseen = {s: _unseen(ref, s, trains[0].classes, config) for s in heldout}
        folds = shared_folds(trains, [p["train"] for p in positions], config)
        candidates = score_candidates(cache_names(paths), trains, folds, clfs, config, dev, concat, log)
        chosen = choose(candidates)
        cv_seconds = time.perf_counter() - start
        head, refit_seconds = _refit(chosen, caches, trains, config, dev)
        head.meta["chosen_among"] = [{"candidate": c.label, "cv_score": c.score, "C": c.selection.C} for c in candidates]
        log(f"chosen: {chosen.label} (CV accuracy {chosen.score:.4f}, C={chosen.selection.C:g}); refitted on all of "
            f"train in {refit_seconds:.1f} s")
        report = _report(chosen, candidates, caches, paths, trains[0], config, dev, cv_seconds, refit_seconds)
        report["splits"] = _evaluate(head, chosen.source(caches), heldout, config.tta, unseen)
        if show_all_val:
            report["optimistic"] = {"note": OPTIMISTIC, "candidates": {
                c.label: _evaluate(_refit(c, caches, trains, config, dev)[0], c.source(caches), heldout, config.tta,
                                   unseen, brief=True)
                for c in candidates if not c.chosen}}
    if not heldout:
        report["note"] = "no held-out split in the caches (only train): the CV accuracy is the only estimate"
    return head, report


def _load_trains(caches: Sequence, clfs: Sequence[str], concat: bool, folds: int, log) -> list[TrainSet]:
    """Each cache's train split; in memory (svm/logreg and the fusion need it; at this size it fits)."""
    from .codes import load_train_for

    return [load_train_for(c, clfs, log, in_memory=concat, folds=folds) for c in caches]


def _unseen(cache, split: str, train_classes: np.ndarray, config: HeadConfig) -> dict[str, int]:
    from .report import unseen_classes

    return unseen_classes(cache, split, train_classes, config.allow_unseen_classes)


def _refit(cand: Candidate, caches: Sequence, trains: Sequence[TrainSet], config: HeadConfig,
           device) -> tuple[LinearHead, float]:
    """The candidate's head fitted on all of train at its chosen C."""
    from .format import LinearHead, head_meta
    from .selection import fit_linear

    start = time.perf_counter()
    data = fused_train([trains[i] for i in cand.members]) if cand.fused else trains[cand.members[0]]
    w, b, refit_sel = fit_linear(data, dataclasses.replace(config, clf=cand.clf, C=cand.selection.C), device)
    cand.selection.notes.extend(refit_sel.notes)
    seconds = time.perf_counter() - start
    classes = [caches[0].classes[i] for i in data.classes]
    if not cand.fused:
        meta = head_meta(caches[cand.members[0]], cand.selection, config.tta)
    else:
        members = [head_meta(caches[i], cand.selection, config.tta) for i in cand.members]
        for m in members:
            m.pop("cv"), m.pop("tta")
        meta = {"arch": FUSION + ":" + "+".join(m["arch"] for m in members), "weights": "", "weights_name": "",
                "precision": "", "preprocessing": {}, "feature_dim": int(data.features.shape[1]), "layers": "",
                "fused": members, "cv": cand.selection.to_dict(), "tta": config.tta,
                "cnncodes_version": members[0]["cnncodes_version"]}
    return LinearHead(w, b, data.mean, data.scale, classes, cand.clf, cand.selection.C, meta), seconds


def _evaluate(head: LinearHead, source, heldout: Sequence[str], tta: bool, unseen: dict, brief: bool = False) -> dict:
    from .report import evaluate_split

    out = {s: evaluate_split(head, source, s, tta, unseen[s]) for s in heldout}
    if brief:
        return {s: {k: r[k] for k in ("images", "accuracy", "correct")} for s, r in out.items()}
    return out


def _report(chosen: Candidate, candidates: list[Candidate], caches: Sequence, paths: Sequence[Path], train: TrainSet,
            config: HeadConfig, device, cv_seconds: float, refit_seconds: float) -> dict:
    """The report's selection part; the layout of a single-cache report where it overlaps."""
    names = cache_names(paths)
    return {
        "caches": [{"name": n, "path": str(c.path), "arch": c.config.arch, "weights": c.config.weights_name,
                    "precision": c.config.precision, "layers": c.config.layers, "feature_dim": c.feature_dim,
                    "preprocessing": c.config.preprocessing} for n, c in zip(names, caches)],
        "candidates": [c.to_dict() for c in candidates],
        "chosen": chosen.label,
        "cache": [str(caches[i].path) for i in chosen.members] if chosen.fused else str(caches[chosen.members[0]].path),
        "clf": chosen.clf, "C": chosen.selection.C, "selection": chosen.selection.to_dict(), "tta": config.tta,
        "cv_seconds": round(cv_seconds, 3), "refit_seconds": round(refit_seconds, 3),
        "fit_seconds": round(cv_seconds + refit_seconds, 3), "device": str(device),
        "train": {"images": len(np.unique(train.groups)), "codes": len(train.y)},
    }
