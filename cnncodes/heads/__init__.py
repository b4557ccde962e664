"""Linear heads on cached CNN codes: fit with grouped cross-validation of C, report, save as HDF5.

Where things live (input -> output):

- `names`: the head names (`CLFS`, `TORCH_CLFS`) and the C grid, shared with the CLI.
- `format`: `LinearHead` and its HDF5 file (`save`/`load`, `to_sklearn`), `softmax`, `as_class_rows`
  and its inverse `as_sklearn_rows`.
- `codes`: the train split as the solvers see it (`load_train` -> `TrainSet`), streamed
  blocks (`iter_blocks`), standardiser statistics, image ids per row, the memory budget.
- `selection`: grouped folds, CV scores per (fold, C), the pick, the refit (`fit_linear`).
- `rowspace`: the codes in their row space when there are fewer rows than dimensions (exact, cheaper).
- `torch_solver`: linear / linear-svm fold models (minibatch Adam, streamed); `estimator`:
  `TorchLinearClassifier`, the same solver as a scikit-learn estimator.
- `lbfgs`: full-batch, preconditioned L-BFGS on codes in memory, C by C (every head whose codes fit in
  memory), stopping on the Newton decrement.
- `report`: scoring per image and the per-split report (accuracy, per class, confusion).
- `multi`: choosing among caches (and heads, and their fusion) by the same grouped CV folds on
  train, then refitting and evaluating only the chosen candidate (`fit_head_multi`).
- here: `fit_head`, cache in, (head, report) out.

Every head, whatever trained it, ends as the same linear form: standardise the code
(`(x - mean) / scale`), then `scores = coef @ z + intercept`, one row per class. Binary
scikit-learn models (one coefficient row `w`) are held as the two rows `[-w/2, w/2]`, so
softmax(scores) equals their sigmoid and argmax their sign rule. That form folds into a
ResNet's `fc` (see `LinearHead.folded` and `cnncodes.predict.export_head`). The head file
stores scikit-learn's own layout (binary: the one row; docs/formats.md), and
`LinearHead.to_sklearn()` gives the fitted `Pipeline(StandardScaler, LogisticRegression|LinearSVC)`.

Heads (`--clf`):

- ``svm``: scikit-learn `LinearSVC`'s objective (squared hinge, one-vs-rest, intercept penalised like a
  weight), codes in memory, solved by `lbfgs.lbfgs_path` in torch (all folds at once, warm-started along
  C): faster than liblinear on every set measured, whose dual solver crawls at large C (a minute for
  one C of a 720-image, 12-class set).
- ``logreg``: scikit-learn `LogisticRegression`'s objective (multinomial softmax), codes in memory,
  solved by `lbfgs.lbfgs_path` as svm is (scikit-learn's own lbfgs stops on an absolute gradient, 2-22%
  above the optimum at C = 10-100 on 245 x 2048 codes, and runs one job per core).
  Both are checked against scikit-learn solved tightly in float64 (tests/test_head_reference.py).
- ``linear``: `TorchLinearClassifier` with the softmax loss: the same objective as ``logreg``
  solved by minibatch Adam, streaming the cache in chunks (CPU or CUDA).
- ``linear-svm``: `TorchLinearClassifier` with the multiclass (Crammer-Singer) hinge loss,
  the streaming SVM.

C means the same for all of them: the objective is ``mean loss + ||W||^2 / (2 C n)``
(scikit-learn's ``||W||^2 / 2 + C * sum loss``, divided by ``C n``).

Why minibatch Adam for the torch head (and not full-batch L-BFGS): caches larger than memory
can only be visited in chunks, one block at a time, and a stochastic method needs nothing
but the current block; L-BFGS needs exact full-data gradients every iteration, i.e. a full
read of the cache per step (tens of reads per fit). The L2 penalty sits in the loss (Adam,
not AdamW's decoupled decay) so the fit converges to the same regularised optimum that
scikit-learn finds, and C is comparable across heads; a linear learning-rate decay to zero
makes the last iterates settle. All candidate (fold, C) models are trained in the same pass
as one batched (M, classes, D) weight tensor, so cross-validation costs one read of the
data per epoch, not one per model.
When the train codes fit in memory (`codes.IN_MEMORY_BYTES`) and no epoch count is given, the
torch heads use full-batch L-BFGS instead (`lbfgs.lbfgs_path`: all folds at once, C by C,
warm-started, preconditioned by the codes' second moment, stopping the C path like svm/logreg,
then the full-data model at the chosen C; linear-svm then fits a smoothed hinge, within
tau log K of the hinge); the report's selection notes say which solver ran.

Choosing C (``C="auto"``, grid 1e-5 ... 10, one value per decade) uses the train split only.
Folds are dealt per source image (the ids of `Cache.groups`, read in chunks by `image_groups`),
stratified by class (`grouped_folds`: `StratifiedGroupKFold` for one-label groups, vectorised),
so all views of an image land in one fold. Up to `HOLDOUT_ABOVE` codes: k-fold (default 5).
Above it: one stratified, grouped held-out tenth of train, scored once (k-fold would mean k
times the training work on a large cache for little gain in the estimate). A fold is scored as the
final report is: per image, on the plain view (or averaging all views with ``tta``). The
best mean accuracy wins; ties go to the smallest C (the most regularised). The standardiser
is fitted once on all train codes (label-free statistics; per-fold scalers change CV scores
negligibly and would cost an extra pass per fold). Held-out splits are read only after the
head is fitted, for the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..lazy import lazy_exports
from .names import C_GRID, CLFS, TORCH_CLFS

if TYPE_CHECKING:
    from .config import HeadConfig
    from .format import LinearHead

# Public names, imported from their module on first use: `cnncodes fit-head --help` (which needs
# only CLFS) does not pay for torch and scikit-learn.
_LAZY = {
    "LinearHead": "format", "HEAD_FORMAT": "format", "HEAD_VERSION": "format", "softmax": "format",
    "as_class_rows": "format", "as_sklearn_rows": "format",
    "TrainSet": "codes", "load_train": "codes", "iter_blocks": "codes", "code_stats": "codes",
    "image_groups": "codes", "available_memory": "codes",
    "Selection": "selection", "cv_folds": "selection", "grouped_folds": "selection", "fit_linear": "selection",
    "HeadConfig": "config", "parse_C": "config",
    "TorchLinearClassifier": "estimator", "auto_epochs": "torch_solver",
    "predict_images": "report", "evaluate_split": "report",
}
__all__ = ["CLFS", "TORCH_CLFS", "C_GRID", "fit_head", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


def fit_head(cache_path: str | Path, clf: str | None = None, C: float | str | None = None, *,
             config: HeadConfig | None = None, log: Callable[[str], None] | None = None,
             **overrides: Any) -> tuple[LinearHead, dict]:
    """Fit a linear head on a cache's train split and report on every other split.

    The options are `config` (default `HeadConfig()`: logreg, C by CV) with `clf`, `C` and
    `overrides`, any of its fields by name (`fit_head(cache, "svm", tta=True)`). clf: svm | logreg |
    linear | linear-svm (see the module docstring). C: "auto" (grouped CV on train only) or a
    number. tta: score held-out images by averaging all their stored views. Returns the head and
    a JSON-friendly report. Held-out splits are read only after the head is fitted (their labels
    are checked first for classes the head cannot learn).
    """
    from ..config import with_overrides
    from ..runtime import resolve_device
    from ..store import Cache
    from .codes import load_train_for, read_exclusions
    from .config import HeadConfig
    from .format import LinearHead, head_meta
    from .report import evaluate_split, unseen_classes
    from .selection import fit_linear

    given = {k: v for k, v in (("clf", clf), ("C", C)) if v is not None}
    config = with_overrides(HeadConfig, config, {**given, **overrides}, "fit_head")
    clf, tta = config.clf, config.tta
    log = log or (lambda m: None)
    dev = resolve_device(config.device)

    start = time.perf_counter()
    exclude = read_exclusions(config.exclude)
    with Cache(cache_path) as cache:
        data = load_train_for(cache, [clf], log, folds=config.folds, exclude=exclude)
        heldout = [s for s in cache.splits if s != "train"]
        unseen = {s: unseen_classes(cache, s, data.classes, config.allow_unseen_classes) for s in heldout}
        w, b, sel = fit_linear(data, config, dev)
        fit_seconds = time.perf_counter() - start
        head = LinearHead(w, b, data.mean, data.scale, [cache.classes[i] for i in data.classes], clf, sel.C,
                          head_meta(cache, sel, tta))
        log(f"fitted {clf} in {fit_seconds:.1f} s: C={sel.C:g}" + (f" (CV accuracy {sel.score:.4f}, {sel.strategy})" if sel.auto else ""))
        report = {
            "cache": str(cache.path), "clf": clf, "C": sel.C, "selection": sel.to_dict(), "tta": tta,
            "fit_seconds": round(fit_seconds, 3), "device": str(dev),
            "train": {"images": len(np.unique(data.groups)), "codes": len(data.y)},
            "splits": {s: evaluate_split(head, cache, s, tta, unseen[s]) for s in heldout},
        }
        if exclude is not None:
            report["excluded"] = _excluded_report(head, cache, exclude, heldout, tta, log)
    if not heldout:
        report["note"] = "no held-out split in the cache (only train): the CV accuracy is the only estimate"
    return head, report


def _excluded_report(head: LinearHead, cache, exclude, heldout: list[str], tta: bool,
                     log: Callable[[str], None]) -> dict:
    """What --exclude left out: train images (not fitted on) and, per held-out split, the accuracy without its
    listed images beside the plain figure (audit's leaks: val images that are near copies of train ones)."""
    from .codes import image_groups
    from .report import predict_images

    def images(split: str, rows: np.ndarray) -> int:
        return len(np.unique(image_groups(cache, split)[rows]))

    train = images("train", exclude.rows(cache, "train"))
    out = {"files": list(exclude.files), "train_images": train, "splits": {}}
    log(f"left out {train} train image(s) listed in {', '.join(exclude.files)}")
    lookup = {c: i for i, c in enumerate(cache.classes)}
    to_cache = np.array([lookup[c] for c in head.classes])
    for split in heldout:
        drop = exclude.rows(cache, split)
        if not drop.any():
            continue
        (rows, pred), = predict_images(cache.features(split), image_groups(cache, split), cache.views(split),
                                       drop.astype(np.int64), {0: (head.coef[None], head.intercept[None])}, tta, split,
                                       head.mean, head.scale).values()  # rows keyed 1 (listed) are not scored
        correct = int((to_cache[pred[:, 0]] == cache.labels(split)[rows]).sum())
        out["splits"][split] = {"left_out": images(split, drop), "images": len(rows), "correct": correct,
                                "accuracy": correct / len(rows) if len(rows) else None}
    if not train and not out["splits"] and any(exclude.paths.values()):
        log(f"note: none of the paths in {', '.join(exclude.files)} are images of {cache.path}")
    return out
