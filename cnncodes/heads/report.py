"""Scoring per image (plain view, or all views averaged with tta) and the report of a head on a split:
accuracy, per-class precision/recall, confusion matrix; classes a split has but train lacks.
"""

from __future__ import annotations

import numpy as np

from ..errors import CnnCodesError
from .codes import BLOCK_BYTES, image_groups, nonfinite_error, read_rows
from .format import LinearHead

def predict_images(features, groups: np.ndarray, views: np.ndarray, key: np.ndarray, models: dict,
                   tta: bool, split: str = "train", mean=None, scale=None,
                   block_bytes: int = BLOCK_BYTES) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Predicted class per image, streaming the rows in order.

    key: per row, which entry of `models` ({key: (W (G, K, D), b (G, K))}) scores it; rows with
    a key not in `models` are skipped. Scores are averaged over an image's views with `tta`,
    else only its plain view (views == 0) is used. Returns {key: (first row of each image,
    predicted class per image and model (n, G))}. Raises on NaN/inf codes among the rows used.
    """
    n, d = features.shape
    used = np.isin(key, list(models)) & (True if tta else views == 0)
    is_start = np.r_[True, groups[1:] != groups[:-1]] if n else np.zeros(0, bool)
    image_start, image_id = np.flatnonzero(is_start), np.cumsum(is_start) - 1
    block_rows = max(1, block_bytes // (4 * max(d, 1)))
    out: dict[int, list] = {k: [] for k in models}
    bad, a = 0, 0
    while a < n:
        nxt = np.searchsorted(image_start, a + block_rows)
        b = int(image_start[nxt]) if nxt < len(image_start) else n
        b = b if b > a else n  # one image larger than a block: take it whole
        r = used[a:b]
        if r.any():
            x = np.empty((b - a, d), np.float32)
            read_rows(features, a, b, x)
            if not r.all():
                x = x[r]
            ids, keys = image_id[a:b][r], key[a:b][r]
            bad += int((~np.isfinite(x).all(axis=1)).sum())
            if mean is not None:
                x -= mean.astype(np.float32)
                x /= scale.astype(np.float32)
            for k in np.unique(keys):
                sel = keys == k
                w, bias = models[int(k)]
                g, kk = bias.shape
                s = x[sel] @ w.reshape(g * kk, d).T.astype(np.float32) + bias.reshape(-1).astype(np.float32)
                first = np.flatnonzero(np.r_[True, ids[sel][1:] != ids[sel][:-1]])
                summed = np.add.reduceat(s, first, axis=0)
                rows = np.flatnonzero(r)[sel][first] + a
                out[int(k)].append((rows, summed.reshape(-1, g, kk).argmax(axis=2)))
        a = b
    if bad:
        raise nonfinite_error(split, bad, int(used.sum()))
    return {k: (np.concatenate([r for r, _ in v]) if v else np.zeros(0, np.int64),
                np.concatenate([p for _, p in v]) if v else np.zeros((0, models[k][1].shape[0]), np.int64))
            for k, v in out.items()}


def unseen_classes(cache, split: str, train_classes: np.ndarray, allow: bool) -> dict[str, int]:
    """Images per class of `split` that has no training codes; refused unless `allow`."""
    labels = cache.labels(split)
    missing = np.setdiff1d(np.unique(labels), train_classes)
    if not len(missing):
        return {}
    views = cache.views(split)
    counts = {cache.classes[c]: int(((labels == c) & (views == 0)).sum()) for c in missing}
    if counts and not allow:
        names = ", ".join(f"'{c}' ({n} images)" for c, n in counts.items())
        raise CnnCodesError(f"{split} has class(es) {names} with no training codes, so a head cannot predict them; "
                            f"add training images of them, remove them from {split}, or pass --allow-unseen-classes "
                            f"to report with them counted as errors")
    return counts


def evaluate_split(head: LinearHead, cache, split: str, tta: bool, unseen: dict[str, int] | None = None) -> dict:
    """Per-image accuracy, per-class precision/recall and the confusion matrix of `head` on a split."""
    feats, labels, views, groups = cache.features(split), cache.labels(split), cache.views(split), image_groups(cache, split)
    if head.n_features != feats.shape[1]:
        raise CnnCodesError(f"{cache.path}: {feats.shape[1]}-d codes but the head expects {head.n_features}-d")
    lookup = {c: i for i, c in enumerate(cache.classes)}
    to_cache = np.array([lookup[c] for c in head.classes])
    preds = predict_images(feats, groups, views, np.zeros(len(labels), np.int64),
                           {0: (head.coef[None], head.intercept[None])}, tta, split, head.mean, head.scale)
    rows, pred = preds[0]
    if not len(rows):
        return {"images": 0, "views_per_image": 0, "accuracy": None, "correct": 0, "per_class": {},
                "confusion": {"labels": [], "matrix": []}, "unseen_classes": unseen or {}}
    y_true, y_pred = labels[rows], to_cache[pred[:, 0]]
    names = sorted(set(y_true.tolist()) | set(to_cache.tolist()))
    matrix = _confusion(y_true, y_pred, names)
    support, predicted, hits = matrix.sum(1), matrix.sum(0), np.diag(matrix)
    p = np.divide(hits, predicted, out=np.zeros(len(names)), where=predicted > 0)  # 0 where never predicted
    r = np.divide(hits, support, out=np.zeros(len(names)), where=support > 0)
    used = len(labels) if tta else len(rows)
    return {
        "images": len(rows),
        "views_per_image": round(used / max(len(rows), 1), 3),  # > 1 only with tta and stored eval views
        "accuracy": float((y_true == y_pred).mean()),
        "correct": int((y_true == y_pred).sum()),
        "per_class": {cache.classes[c]: {"precision": float(pi), "recall": float(ri), "support": int(si)}
                      for c, pi, ri, si in zip(names, p, r, support)},
        "confusion": {"labels": [cache.classes[c] for c in names],
                      "matrix": matrix.tolist()},
        "unseen_classes": unseen or {},
    }


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, labels: list[int]) -> np.ndarray:
    """Counts (rows true, columns predicted) over `labels`, as scikit-learn's confusion_matrix (whose import alone
    costs fit-head a second)."""
    index = {c: i for i, c in enumerate(labels)}
    t, q = np.array([index[c] for c in y_true.tolist()]), np.array([index[c] for c in y_pred.tolist()])
    matrix = np.zeros((len(labels), len(labels)), np.int64)
    np.add.at(matrix, (t, q), 1)
    return matrix
