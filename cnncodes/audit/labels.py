"""Label issues: out-of-fold class probabilities of every train image from the grouped CV `fit-head` runs
(the head and C it would choose; all views of an image in one fold), ranked by cleanlab's confident learning.

cache -> `load_train_for` -> `fit_linear` (C, as fit-head) -> one model per fold at that C -> out-of-fold
scores per image -> probabilities (softmax, one temperature fitted to them) -> `cleanlab.filter.find_label_issues`
-> `LabelIssues`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import CnnCodesError
from ..heads.codes import TrainSet, load_train_for
from ..heads.config import HeadConfig
from ..heads.format import as_class_rows, softmax
from ..heads.selection import fit_linear, grouped_folds

RANKED_BY = "self_confidence"  # cleanlab's ranking: the out-of-fold probability of the given label, lowest first


@dataclass
class LabelIssues:
    """The train images cleanlab flags, most suspicious first, and how the probabilities were made."""

    image_rows: np.ndarray  # first row of each train image in the cache (index into the train split)
    labels: np.ndarray  # (n,) given class, index into the train classes (`classes`)
    probs: np.ndarray  # (n, K) out-of-fold probabilities
    classes: np.ndarray  # cache class index of each probability column
    flagged: np.ndarray  # image indices flagged, most suspicious first
    quality: np.ndarray  # (n,) cleanlab's self-confidence per image (low: suspicious)
    head: dict = field(default_factory=dict)  # clf, C, CV score, folds, notes
    seconds: float = 0.0

    def suggested(self) -> np.ndarray:
        """Per image, the most probable class other than the given one (index into `classes`)."""
        p = self.probs.copy()
        p[np.arange(len(p)), self.labels] = -1.0
        return p.argmax(axis=1)


def find_label_issues(cache, config: HeadConfig, log=lambda m: None) -> LabelIssues:
    """Choose the head's C as `fit-head` would, compute out-of-fold probabilities at that C, let cleanlab flag."""
    from ..runtime import resolve_device

    cleanlab_find, get_label_quality_scores = cleanlab_functions()

    start = time.perf_counter()
    dev = resolve_device(config.device)
    data = load_train_for(cache, [config.clf], log, folds=config.folds, in_memory=True)  # folds are row subsets
    check_classes(data, np.unique(data.groups, return_index=True)[1], cache.classes, cache.path)
    w, b, sel = fit_linear(data, config, dev)  # the head fit-head would fit: its C, and a warm start for the folds
    notes = list(sel.notes)
    scores, first, n_folds = out_of_fold_scores(data, replace(config, C=sel.C), dev, init=(w, b), notes=notes)
    labels = data.y[first]
    beta = temperature_scale(scores, labels)
    probs = softmax(beta * scores)
    flagged = cleanlab_find(labels, probs, return_indices_ranked_by=RANKED_BY, n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method=RANKED_BY)
    if config.clf in ("svm", "linear-svm"):
        notes.append(f"{config.clf}: the probabilities are the softmax of SVM scores (a monotone confidence, not "
                     f"calibrated); --clf logreg gives calibrated ones")
    head = {"clf": config.clf, "C": sel.C, "C_auto": sel.auto, "cv_score": sel.score, "strategy": sel.strategy,
            "out_of_fold": f"{n_folds}-fold over train images (views of one image in one fold), seed {config.seed}",
            "temperature": 1 / beta,
            "tta": config.tta, "notes": sorted(set(notes))}
    return LabelIssues(first, labels, probs, data.classes, np.asarray(flagged, np.int64), np.asarray(quality),
                       head, time.perf_counter() - start)


def cleanlab_functions():
    """cleanlab's find_label_issues and get_label_quality_scores, or one line saying how to install it."""
    try:
        from cleanlab.filter import find_label_issues as cleanlab_find
        from cleanlab.rank import get_label_quality_scores
    except ImportError as e:
        raise CnnCodesError(f"cnncodes audit ranks label issues with cleanlab, which is not installed ({e}): "
                            f"pip install 'cnncodes[audit]' (or pip install cleanlab)") from None
    return cleanlab_find, get_label_quality_scores


def out_of_fold_scores(data: TrainSet, config: HeadConfig, device, init: tuple | None = None,
                       notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(images, K) class scores of each train image from the model fitted at config's fixed C without its fold,
    the first row of each image, and the number of folds. Folds as `fit-head`'s k-fold CV (`grouped_folds`, same
    seed); above its held-out threshold too every image gets a fold, so every image is scored. The fold models
    are solved together on the head's objective (`lbfgs_path`, one preparation of the codes), each started from
    `init` (the full-data model at that C, near every fold's optimum: ~4x fewer iterations than from zero)."""
    from ..heads.lbfgs import lbfgs_path
    from ..heads.precondition import prepare
    from ..heads.selection import LBFGS_LOSS

    ids, first = np.unique(data.groups, return_index=True)
    image = np.searchsorted(ids, data.groups)
    k = min(config.folds, len(ids))
    if k < 2:
        raise CnnCodesError(f"only {len(ids)} training image(s): too few for out-of-fold probabilities")
    fold = grouped_folds(data.y, data.groups, k, config.seed)
    n_classes = len(data.classes)
    if init is not None and np.shape(init[0])[0] == n_classes:  # in the solver's own layout (one row per class)
        init = (np.repeat(np.asarray(init[0])[None], k, 0), np.repeat(np.asarray(init[1])[None], k, 0))
    else:
        init = None
    (fit,) = lbfgs_path(data.features, data.y, n_classes, fold, np.arange(k), [config.fixed_C], LBFGS_LOSS[config.clf],
                        init=init, notes=notes, prepared=prepare(data.features, data.y, device))
    w, b = fit[0], fit[1]
    scores = np.zeros((len(ids), n_classes))
    used = np.ones(len(data.y), bool) if config.tta else data.views == 0  # the rows fit-head scores an image by
    for f in range(k):
        rows = np.flatnonzero((fold == f) & used)
        wf, bf = as_class_rows(w[f], b[f])
        np.add.at(scores, image[rows], data.features[rows].astype(np.float64) @ wf.T.astype(np.float64) + bf)
    counts = np.bincount(image[used], minlength=len(ids))
    return scores / np.maximum(counts, 1)[:, None], first, k


def temperature_scale(scores: np.ndarray, labels: np.ndarray) -> float:
    """The inverse temperature that makes softmax(beta * scores) best explain `labels` (least log-loss; Guo et
    al. 2017; one parameter: every prediction unchanged, and with 2 classes the order of the suspects too). Why: C is chosen for accuracy, ties to the smallest,
    and a strongly regularised head's probabilities hug 1/K (C=1e-5: 0.499-0.501), where cleanlab's per-class
    thresholds (the mean probability of each class) no longer separate the suspects from the rest."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    rows = np.arange(len(labels))

    def loss(log_beta: float) -> float:
        return -float(log_softmax(np.exp(log_beta) * scores, axis=1)[rows, labels].mean())

    return float(np.exp(minimize_scalar(loss, bounds=(-10.0, 15.0), method="bounded").x))


def check_classes(data: TrainSet, first: np.ndarray, names: list[str], path) -> None:
    """Every class needs two train images: folds are dealt class by class, so each fold's training part then
    holds every class (a class's only image, held out, could not be scored by a model that never saw it)."""
    counts = np.bincount(data.y[first], minlength=len(data.classes))
    few = [f"'{names[c]}' ({n})" for c, n in zip(data.classes, counts) if n < 2]
    if few:
        raise CnnCodesError(f"{path}: class(es) {', '.join(few)} have fewer than 2 train images; out-of-fold "
                            f"probabilities need 2 per class: add images or remove the class from train")
