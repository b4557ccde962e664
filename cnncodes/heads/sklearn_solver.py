"""The in-memory heads: scikit-learn `LinearSVC` (svm) and `LogisticRegression` (logreg) along the C grid,
one job per fold (logreg, warm-started path) or per (fold, C) (svm), in threads, C by C so
that the search can stop early; codes with fewer rows than dimensions are fitted in their row space.

standardised codes in memory + fold ids -> {fold: (W (1, K, D), b (1, K))} per C, ascending.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import codes
from .codes import SKLEARN_BYTES_PER_VALUE, TrainSet
from .format import as_class_rows

# LinearSVC's stopping rule. scikit-learn's default tol 1e-4 is 1000x liblinear's own for the dual solvers (0.1);
# 1e-3 cut the svm C search on real ResNet-50 codes of the 1,437 digits by ~22% of CPU time with the same CV
# scores, C and val accuracy (1e-2 changed them). max_iter bounds the large C values where dual coordinate descent
# crawls (an unconverged fit becomes a selection note); 5000 let one C of a 720-image, 12-class set take a minute.
SVM_TOL = 1e-3
SVM_MAX_ITER = 1000


def _sklearn_estimator(clf: str, seed: int, shape: tuple[int, int]):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if clf == "svm":
        # Dual coordinate descent while n is within a few D (3x faster than the primal solver that
        # dual="auto" picks for n > D on 2k x 2k codes); primal (TRON) for n >> D, where dual crawls.
        # tol/max_iter: see SVM_TOL.
        return LinearSVC(C=1.0, dual=bool(shape[0] <= 4 * shape[1]), tol=SVM_TOL, max_iter=SVM_MAX_ITER,
                         random_state=seed)
    return LogisticRegression(C=1.0, max_iter=1000, warm_start=True)


def one_blas_thread():
    """BLAS on one thread: the solvers' matrix-vector products lose more to thread hand-offs than
    they gain (a 7-C logreg path on 2k x 2k codes: 3.7 s with 2 threads, 0.12 s with 1; 90k x 512:
    38 s vs 5.7 s on a busy 2-core machine). Parallelism comes from running jobs in threads."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


@contextlib.contextmanager
def _quiet_convergence() -> Iterator[None]:
    """Silence sklearn's ConvergenceWarning (it becomes a note). Entered by the calling thread
    only: catch_warnings swaps process-wide state and is not safe to nest across threads."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


# Fit in the row space of the codes when a fold has fewer rows than this fraction of the code dimension.
ROTATE_BELOW = 0.75


@dataclass
class FoldCodes:
    """One fold's training codes as the solver sees them: x (n, r), labels, and the basis (D, r) they
    are expressed in (None: x are the standardised codes themselves, r = D)."""

    x: np.ndarray
    y: np.ndarray
    basis: np.ndarray | None = None

    def to_codes(self, w: np.ndarray) -> np.ndarray:
        """Weights (..., r) in the fold's basis -> weights (..., D) on the standardised codes."""
        return w if self.basis is None else w @ self.basis.T


def fold_codes(clf: str, features: np.ndarray, y: np.ndarray, rotate: bool = True) -> FoldCodes:
    """The codes a solver fits, in the row space of `features` when it has fewer rows than dimensions.

    Why it is exact: with an L2 penalty on w and a loss that sees the codes only through
    x_i . w, the optimum lies in the span of the rows (w = sum a_i x_i), so fitting on
    z = x Q, where Q (D, n) is an orthonormal basis of that span (QR of x^T, z = R^T), and mapping
    back w = w_z Q^T gives the same model. LinearSVC's dual depends on the codes only through
    the Gram matrix x x^T = z z^T and lbfgs only through inner products, so even the iterates
    match (to rounding); a fit costs n x n instead of n x D per pass.
    """
    dtype = np.float64 if clf == "svm" else np.float32  # liblinear copies anything else to float64, per fit
    n, d = features.shape
    if not rotate or n >= ROTATE_BELOW * d:
        return FoldCodes(np.ascontiguousarray(features, dtype=dtype), y)
    q, r = np.linalg.qr(np.asarray(features, dtype=np.float64).T)  # x^T = Q R, so x = R^T Q^T
    return FoldCodes(np.ascontiguousarray(r.T, dtype=dtype), y, q)


def _fit_C(est, clf: str, codes_: FoldCodes, n_classes: int, C: float, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """W (K, D), b (K,) at one C; `est` keeps its state between calls (logreg warm-starts from the last C)."""
    x, y = codes_.x, codes_.y
    w = np.zeros((n_classes, x.shape[1]))
    b = np.full(n_classes, -1e30)  # a class absent from a fold is never predicted
    present = np.unique(y)
    if len(present) < 2:
        b[present] = 0.0
        return codes_.to_codes(w), b
    est.set_params(C=float(C)).fit(x, y)
    # Read from the estimator, not from a warnings.catch_warnings: this runs in pool threads
    # and warning filters are process-wide (the caller silences the printed warning).
    if np.max(est.n_iter_) >= est.max_iter:
        notes.append(f"{clf} did not fully converge at C={C:g}")
    coef, icpt = as_class_rows(est.coef_, est.intercept_)
    w[est.classes_] = coef
    b[est.classes_] = icpt
    return codes_.to_codes(w), b


class _Folds:
    """Fold codes on demand. Rotated folds (small) are made once and shared by that fold's jobs;
    unrotated ones are copied inside each job, so at most `workers` copies exist at once."""

    def __init__(self, clf: str, data: TrainSet, fold: np.ndarray, rotate: bool):
        self.clf, self.data, self.fold, self.rotate = clf, data, fold, rotate
        self._made: dict[int, FoldCodes] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, f: int) -> FoldCodes:
        keep = self.fold != f
        n, d = int(keep.sum()), self.data.features.shape[1]
        if not self.rotate or n >= ROTATE_BELOW * d:
            return fold_codes(self.clf, self.data.features[keep], self.data.y[keep], rotate=False)
        with self._lock:
            lock = self._locks.setdefault(f, threading.Lock())
        with lock:
            if f not in self._made:
                self._made[f] = fold_codes(self.clf, self.data.features[keep], self.data.y[keep])
            return self._made[f]


def fold_path(clf: str, data: TrainSet, fold: np.ndarray, n_folds: int, grid: Sequence[float], seed: int,
              notes: list[str], rotate: bool = True) -> Iterator[dict[int, tuple[np.ndarray, np.ndarray]]]:
    """The fold models C by C, ascending: yields {fold: (W (1, K, D), b (1, K))} for grid[0], grid[1], ...

    Jobs run ahead in threads (liblinear and lbfgs release the GIL): logreg one warm-started C
    path per fold, svm (no warm start in liblinear) one job per (fold, C), queued C by C.
    Closing the generator stops the path: queued jobs never start, running ones finish their C.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from ..runtime import available_cores

    K = len(data.classes)
    results = {(f, i): Future() for f in range(n_folds) for i in range(len(grid))}
    stopped = threading.Event()
    folds = _Folds(clf, data, fold, rotate)
    per_job = [[i] for i in range(len(grid))] if clf == "svm" else [list(range(len(grid)))]
    jobs = [(f, idx) for idx in per_job for f in range(n_folds)]

    def run(f: int, idx: list[int]) -> None:
        try:
            fc = folds.get(f)
            est = _sklearn_estimator(clf, seed, fc.x.shape)
            for i in idx:
                if stopped.is_set():
                    return
                w, b = _fit_C(est, clf, fc, K, grid[i], notes)
                results[(f, i)].set_result((w[None], b[None]))
        except BaseException as e:  # handed to the consumer, which raises it
            for i in idx:
                if not results[(f, i)].done():
                    results[(f, i)].set_exception(e)

    room = max(1, codes.available_memory() // max(SKLEARN_BYTES_PER_VALUE[clf][1] * data.features.size, 1))
    pool = ThreadPoolExecutor(max(1, min(len(jobs), available_cores(), room)))
    with one_blas_thread(), _quiet_convergence():
        try:
            for f, idx in jobs:
                pool.submit(run, f, idx)
            for i in range(len(grid)):
                yield {f: results[(f, i)].result() for f in range(n_folds)}
        finally:
            stopped.set()
            pool.shutdown(wait=True, cancel_futures=True)


def sklearn_refit(clf: str, data: TrainSet, C: float, seed: int, notes: list[str],
                  rotate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The final model on all train codes at the chosen C: W (K, D), b (K,)."""
    with one_blas_thread(), _quiet_convergence():
        fc = fold_codes(clf, data.features, data.y, rotate)
        return _fit_C(_sklearn_estimator(clf, seed, fc.x.shape), clf, fc, len(data.classes), C, notes)
