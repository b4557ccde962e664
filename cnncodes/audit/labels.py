"""Label issues: out-of-fold class probabilities of every train image from the grouped CV `fit-head` runs
(the head and C it would choose; all views of an image in one fold), ranked by cleanlab's confident learning.

cache -> `load_train_for` -> `fit_linear` (C, as fit-head) -> one model per fold at that C -> out-of-fold
probabilities per image -> `cleanlab.filter.find_label_issues` -> `LabelIssues`.
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

    cleanlab_find, get_label_quality_scores = _cleanlab()

    start = time.perf_counter()
    dev = resolve_device(config.device)
    data = load_train_for(cache, [config.clf], log, folds=config.folds, in_memory=True)  # folds are row subsets
    check_classes(data, np.unique(data.groups, return_index=True)[1], cache.classes, cache.path)
    _, _, sel = fit_linear(data, config, dev, refit=False)
    fixed = replace(config, C=sel.C)
    probs, first, n_folds = out_of_fold_probabilities(data, fixed, dev)
    labels = data.y[first]
    flagged = cleanlab_find(labels, probs, return_indices_ranked_by=RANKED_BY, n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method=RANKED_BY)
    notes = list(sel.notes)
    if config.clf in ("svm", "linear-svm"):
        notes.append(f"{config.clf}: the probabilities are the softmax of SVM scores (a monotone confidence, not "
                     f"calibrated); --clf logreg gives calibrated ones")
    head = {"clf": config.clf, "C": sel.C, "C_auto": sel.auto, "cv_score": sel.score, "strategy": sel.strategy,
            "out_of_fold": f"{n_folds}-fold over train images (views of one image in one fold), seed {config.seed}",
            "tta": config.tta, "notes": sorted(set(notes))}
    return LabelIssues(first, labels, probs, data.classes, np.asarray(flagged, np.int64), np.asarray(quality),
                       head, time.perf_counter() - start)


def _cleanlab():
    """cleanlab's find_label_issues and get_label_quality_scores, or one line saying how to install it."""
    try:
        from cleanlab.filter import find_label_issues as cleanlab_find
        from cleanlab.rank import get_label_quality_scores
    except ImportError as e:
        raise CnnCodesError(f"cnncodes audit ranks label issues with cleanlab, which is not installed ({e}): "
                            f"pip install 'cnncodes[audit]' (or pip install cleanlab)") from None
    return cleanlab_find, get_label_quality_scores


def out_of_fold_probabilities(data: TrainSet, config: HeadConfig, device) -> tuple[np.ndarray, np.ndarray, int]:
    """(images, K) probabilities of each train image from the model fitted without its fold, the first row of
    each image, and the number of folds. Folds as `fit-head`'s k-fold CV (`grouped_folds`, same seed); above
    its held-out threshold too every image gets a fold, so every image is scored."""
    ids, first = np.unique(data.groups, return_index=True)
    image = np.searchsorted(ids, data.groups)
    k = min(config.folds, len(ids))
    if k < 2:
        raise CnnCodesError(f"only {len(ids)} training image(s): too few for out-of-fold probabilities")
    fold = grouped_folds(data.y, data.groups, k, config.seed)
    scores = np.zeros((len(ids), len(data.classes)))
    used = np.ones(len(data.y), bool) if config.tta else data.views == 0  # the rows fit-head scores an image by
    for f in range(k):
        w, b = _fold_model(data, fold != f, config, device)
        rows = np.flatnonzero((fold == f) & used)
        np.add.at(scores, image[rows], data.features[rows].astype(np.float64) @ w.T + b)
    counts = np.bincount(image[used], minlength=len(ids))
    return softmax(scores / np.maximum(counts, 1)[:, None]), first, k


def _fold_model(data: TrainSet, rows: np.ndarray, config: HeadConfig, device) -> tuple[np.ndarray, np.ndarray]:
    """W (K, D), b (K,) fitted on the train rows `rows` at config's fixed C (every class has images there:
    `check_classes`)."""
    sub = TrainSet(data.features[rows], data.y[rows], data.groups[rows], data.views[rows], data.mean, data.scale,
                   data.classes)
    w, b, _ = fit_linear(sub, config, device)
    return as_class_rows(w, b)


def check_classes(data: TrainSet, first: np.ndarray, names: list[str], path) -> None:
    """Every class needs two train images: folds are dealt class by class, so each fold's training part then
    holds every class (a class's only image, held out, could not be scored by a model that never saw it)."""
    counts = np.bincount(data.y[first], minlength=len(data.classes))
    few = [f"'{names[c]}' ({n})" for c, n in zip(data.classes, counts) if n < 2]
    if few:
        raise CnnCodesError(f"{path}: class(es) {', '.join(few)} have fewer than 2 train images; out-of-fold "
                            f"probabilities need 2 per class: add images or remove the class from train")
