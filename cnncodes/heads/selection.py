"""Choosing C: grouped, stratified folds over the train images, scoring each (fold, C) model per image,
picking the best mean accuracy (ties to the smallest C), and refitting on all of train.

`fit_linear`: TrainSet -> the fold models of one solver family -> CV scores -> C -> W (K, D), b (K,).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import CnnCodesError
from .codes import TrainSet
from .config import HeadConfig
from .names import HOLDOUT_ABOVE, TORCH_CLFS
from .report import predict_images

HOLDOUT_FOLDS = 10  # held-out fraction = 1 / HOLDOUT_FOLDS
LBFGS_LOSS = {"logreg": "softmax", "svm": "squared-hinge", **TORCH_CLFS}  # the loss each head minimises


def cv_folds(data: TrainSet, folds: int, seed: int) -> tuple[np.ndarray, int, str]:
    """Fold id per row (all views of an image share it), the number of scored folds, a description.

    k-fold up to HOLDOUT_ABOVE codes, else one held-out tenth (fold 0 held out, fold 1 trains).
    """
    n_images = len(np.unique(data.groups))
    holdout = len(data.y) > HOLDOUT_ABOVE
    k = HOLDOUT_FOLDS if holdout else min(folds, n_images)
    if k < 2:
        raise CnnCodesError(f"only {n_images} training image(s): too few to cross-validate C; pass a fixed --C (e.g. --C 0.01)")
    fold = grouped_folds(data.y, data.groups, k, seed)
    if holdout:
        return np.where(fold == 0, 0, 1), 1, f"held-out 1/{HOLDOUT_FOLDS} of train images (more than {HOLDOUT_ABOVE} codes)"
    return fold, k, f"{k}-fold over train images (views of one image in one fold)"


def grouped_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Stratified, grouped k-fold ids per row: images are dealt to folds class by class, in random order.

    What `StratifiedGroupKFold(shuffle=True)` does when each group (image) has one label,
    vectorised: per class, fold sizes differ by at most one image (sklearn's greedy search is
    O(images x folds) in Python, ~15 s for 40k images).
    """
    ids, first = np.unique(groups, return_index=True)
    img_label = y[first]
    rng = np.random.default_rng(seed)
    fold_img = np.empty(len(ids), np.int64)
    offset = 0
    for c in np.unique(img_label):
        members = rng.permutation(np.flatnonzero(img_label == c))
        fold_img[members] = (offset + np.arange(len(members))) % k  # continue where the last class stopped
        offset += len(members)
    return fold_img[np.searchsorted(ids, groups)]


@dataclass
class Selection:
    """Outcome of choosing C: the chosen value, the grid and mean CV accuracy per C tried."""

    C: float
    auto: bool
    grid: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # mean per-image CV accuracy per grid value tried, ascending
    score: float | None = None
    strategy: str = ""
    notes: list[str] = field(default_factory=list)
    stopped: str | None = None  # why the C path ended before the end of the grid

    def to_dict(self) -> dict:
        return {"C": self.C, "auto": self.auto, "grid": self.grid, "cv_scores": self.scores,
                "cv_score": self.score, "strategy": self.strategy, "notes": sorted(set(self.notes)),
                "stopped_early": self.stopped}


def _pick(grid: Sequence[float], fold_scores: np.ndarray) -> tuple[int, np.ndarray]:
    """Best mean accuracy; ties go to the smallest C (grid ascending)."""
    mean = fold_scores.mean(axis=0)
    return int(np.flatnonzero(mean >= mean.max() - 1e-12)[0]), mean


def _stop_reason(grid: Sequence[float], mean: np.ndarray, patience: int | None) -> str | None:
    """Why the ascending C path may stop after the last value tried, or None to go on.

    It stops once the last `patience` values tried have not beaten the best mean CV accuracy
    (ties go to the smallest C, so a plateau counts as no gain): on a curve that rises and
    then stays flat or falls, the exhaustive search would pick the same C.
    """
    tried = len(mean)
    best = int(np.flatnonzero(mean >= mean.max() - 1e-12)[0])
    if patience is None or tried >= len(grid) or tried - 1 - best < patience:
        return None
    skipped = ", ".join(f"{c:g}" for c in grid[tried:])
    return (f"stopped after C={grid[tried - 1]:g}: CV accuracy had not improved on C={grid[best]:g} "
            f"({mean[best]:.4f}) for {patience} larger values; C={skipped} not fitted")


Folds = tuple[np.ndarray, int, str]  # fold id per row, number of scored folds, description (see `cv_folds`)


def fit_linear(data: TrainSet, config: HeadConfig, device="cpu", folds: Folds | None = None,
               refit: bool = True) -> tuple[np.ndarray | None, np.ndarray | None, Selection]:
    """Fit `config.clf` on `data`; C 'auto' chooses C by grouped CV over `config.grid`. Returns
    W (K, D), b (K,) and the selection.

    Codes in memory (every head; the torch heads unless `max_iter` fixes Adam epochs): full-batch L-BFGS
    (`lbfgs`), walking the grid upwards and stopping after `patience` values without a better CV accuracy (None:
    the whole grid) or at a C whose fold fits did not converge. The streamed torch heads (or a fixed `max_iter`)
    train every C in one batched Adam pass.

    `folds`: the CV folds to score on (default `cv_folds` of `data`): choosing among caches
    (`heads.multi`) scores every candidate on the same folds. `refit=False`: only choose C, W and b
    are None (the streamed torch heads fit the full-data models in the same pass and return them).
    """
    clf, C = config.clf, config.fixed_C
    if C is None:
        grid = list(config.grid)
        fold, n_folds, strategy = folds if folds is not None else cv_folds(data, config.folds, config.seed)
    else:
        fold, n_folds, strategy, grid = np.zeros(len(data.y), np.int64), 0, "fixed C", [C]
    sel = Selection(C=C if C is not None else float("nan"), auto=C is None, grid=list(grid), strategy=strategy)
    if clf in TORCH_CLFS and not (data.in_memory and config.max_iter is None):
        return _fit_torch(data, config, grid, fold, n_folds, sel, device)
    from .rowspace import one_blas_thread

    # numpy's BLAS on one thread: the QR of the codes gains nothing from threads, and on busy cores the
    # threads' hand-offs cost 10-20x (real ResNet-50 digits codes: 14.5 s -> 0.8 s with other jobs running).
    # torch's own threads are set apart (`torch_solver._cpu_threads`).
    with one_blas_thread():
        return _fit_lbfgs(data, config, grid, fold, n_folds, sel, device, refit)


def _walk(path, data: TrainSet, fold: np.ndarray, grid: list[float], sel: Selection, tta: bool,
          patience: int | None) -> None:
    """Score the fold models C by C (ascending) until the path ends, `_stop_reason` stops it, or a C's fold fits
    did not converge (that C is not ranked: its CV score would be of models short of their optimum, and larger C
    are harder still); sets sel's pick."""
    columns = []
    for models, converged in path:
        if not converged:
            sel.stopped = (f"stopped at C={grid[len(columns)]:g}: its fold fits did not converge, so it is not ranked; "
                           + (f"C={', '.join(f'{c:g}' for c in grid[len(columns) + 1:])} not fitted"
                              if len(columns) + 1 < len(grid) else "it was the last C"))
            break
        columns.append(_fold_scores(data, fold, models, tta)[:, 0])
        sel.stopped = _stop_reason(grid, np.mean(columns, axis=1), patience)
        if sel.stopped:
            break
    if not columns:
        raise CnnCodesError(f"no C could be ranked: the fold fits did not converge even at C={grid[0]:g} "
                            f"({'; '.join(sel.notes[-1:])}); pass a fixed --C or check the codes")
    best, mean = _pick(grid[:len(columns)], np.stack(columns, axis=1))
    sel.C, sel.scores, sel.score = grid[best], [float(s) for s in mean], float(mean[best])


def _fit_lbfgs(data: TrainSet, config: HeadConfig, grid: list[float], fold: np.ndarray, n_folds: int, sel: Selection,
               device, refit: bool = True) -> tuple[np.ndarray | None, np.ndarray | None, Selection]:
    """Codes in memory: the fold models by full-batch L-BFGS, C by C, stopping the path as `_walk` says; then the
    full-data model at the chosen C, started from the mean of its fold models."""
    from .lbfgs import lbfgs_path
    from .precondition import prepare
    from .torch_solver import SMOOTH_HINGE_TAU

    clf = config.clf
    loss = LBFGS_LOSS[clf]
    solver = {"softmax": "LogisticRegression's objective", "squared-hinge": "LinearSVC's objective",
              "hinge": f"the Crammer-Singer hinge smoothed, tau={SMOOTH_HINGE_TAU:g}"}[loss]
    sel.notes.append(f"{clf}: full-batch L-BFGS on the train codes in memory ({solver}), warm-started along C")
    K, fits = len(data.classes), {}
    prepared = prepare(data.features, data.y, device)  # the row space and preconditioner, for the path and the refit

    def path():
        for C, fit in zip(grid, lbfgs_path(data.features, data.y, K, fold, np.arange(n_folds), grid, loss,
                                           notes=sel.notes, prepared=prepared)):  # a C short of rtol: noted
            fits[C] = (fit.w.mean(0, keepdims=True), fit.b.mean(0, keepdims=True))
            yield {f: (fit.w[f][None], fit.b[f][None]) for f in range(n_folds)}, fit.converged

    if n_folds:
        _walk(path(), data, fold, grid, sel, config.tta, config.patience)
    if not refit:
        return None, None, sel
    final, = lbfgs_path(data.features, data.y, K, fold, np.array([-1]), [sel.C], loss, init=fits.get(sel.C),
                        notes=sel.notes, prepared=prepared)
    return final.w[0].astype(np.float64), final.b[0].astype(np.float64), sel


def _fit_torch(data: TrainSet, config: HeadConfig, grid: list[float], fold: np.ndarray, n_folds: int, sel: Selection,
               device) -> tuple[np.ndarray, np.ndarray, Selection]:
    """All (fold, C) models and the full-data model per C in one batched pass, then the pick."""
    from .torch_solver import train_torch

    G = len(grid)
    heldout = np.repeat(np.r_[np.arange(n_folds), -1], G)  # fold models, then full-data models
    w_all, b_all, _ = train_torch(data.features, data.y, len(data.classes), fold, heldout, np.tile(grid, n_folds + 1),
                                  TORCH_CLFS[config.clf], epochs=config.max_iter, device=device, seed=config.seed,
                                  **data.std_args)
    if n_folds:
        fold_models = {f: (w_all[f * G:(f + 1) * G], b_all[f * G:(f + 1) * G]) for f in range(n_folds)}
        best, mean = _pick(grid, _fold_scores(data, fold, fold_models, config.tta))
        sel.C, sel.scores, sel.score = grid[best], [float(s) for s in mean], float(mean[best])
    best = grid.index(sel.C)
    return w_all[n_folds * G + best].astype(np.float64), b_all[n_folds * G + best].astype(np.float64), sel


def _fold_scores(data: TrainSet, fold: np.ndarray, fold_models: dict, tta: bool) -> np.ndarray:
    """(n_folds, G) per-image accuracy of each fold's models on that fold's held-out images."""
    preds = predict_images(data.features, data.groups, data.views, fold, fold_models, tta, **data.std_args)
    return np.stack([(p == data.y[rows][:, None]).mean(axis=0) for rows, p in (preds[f] for f in sorted(fold_models))])


