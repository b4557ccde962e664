"""The logreg head up to `names.LBFGS_ABOVE` codes: scikit-learn `LogisticRegression` along the C grid, one
warm-started job per fold, in threads, C by C so that the search can stop early; codes with fewer rows than
dimensions are fitted in their row space (`fold_codes`, shared with the L-BFGS path). svm is solved by
`lbfgs` on LinearSVC's objective (see `names.LBFGS_ABOVE` for why).

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
from .codes import SKLEARN_JOB_BYTES, TrainSet
from .format import as_class_rows


def _estimator():
    """The LogisticRegression each fold warm-starts along the C path."""
    from sklearn.linear_model import LogisticRegression

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


def fold_codes(features: np.ndarray, y: np.ndarray, rotate: bool = True) -> FoldCodes:
    """The codes a solver fits, in the row space of `features` when it has fewer rows than dimensions.

    Why it is exact: with an L2 penalty on w and a loss that sees the codes only through
    x_i . w, the optimum lies in the span of the rows (w = sum a_i x_i), so fitting on
    z = x Q, where Q (D, n) is an orthonormal basis of that span (QR of x^T, z = R^T), and mapping
    back w = w_z Q^T gives the same model (the optimum; scikit-learn's lbfgs even takes the same iterates,
    depending on the codes only through inner products); a fit costs n x n instead of n x D per pass.
    """
    n, d = features.shape
    if not rotate or n >= ROTATE_BELOW * d:
        return FoldCodes(np.ascontiguousarray(features, dtype=np.float32), y)
    q, r = np.linalg.qr(np.asarray(features, dtype=np.float64).T)  # x^T = Q R, so x = R^T Q^T
    return FoldCodes(np.ascontiguousarray(r.T, dtype=np.float32), y, q)


def _fit_C(est, codes_: FoldCodes, n_classes: int, C: float, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """W (K, D), b (K,) at one C; `est` keeps its state between calls (it warm-starts from the last C)."""
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
        notes.append(f"logreg did not fully converge at C={C:g}")
    coef, icpt = as_class_rows(est.coef_, est.intercept_)
    w[est.classes_] = coef
    b[est.classes_] = icpt
    return codes_.to_codes(w), b


def fold_path(data: TrainSet, fold: np.ndarray, n_folds: int, grid: Sequence[float], notes: list[str],
              rotate: bool = True) -> Iterator[dict[int, tuple[np.ndarray, np.ndarray]]]:
    """The fold models C by C, ascending: yields {fold: (W (1, K, D), b (1, K))} for grid[0], grid[1], ...

    Jobs run ahead in threads (scikit-learn's lbfgs releases the GIL): one warm-started C path per fold,
    each making its own fold codes (`fold_codes`), so at most `workers` copies exist at once.
    Closing the generator stops the path: queued jobs never start, running ones finish their C.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from ..runtime import available_cores

    K = len(data.classes)
    results = {(f, i): Future() for f in range(n_folds) for i in range(len(grid))}
    stopped = threading.Event()

    def run(f: int) -> None:
        try:
            keep = fold != f
            fc = fold_codes(data.features[keep], data.y[keep], rotate)
            est = _estimator()
            for i, C in enumerate(grid):
                if stopped.is_set():
                    return
                w, b = _fit_C(est, fc, K, C, notes)
                results[(f, i)].set_result((w[None], b[None]))
        except BaseException as e:  # handed to the consumer, which raises it
            for i in range(len(grid)):
                if not results[(f, i)].done():
                    results[(f, i)].set_exception(e)

    room = max(1, codes.available_memory() // max(SKLEARN_JOB_BYTES * data.features.size, 1))
    pool = ThreadPoolExecutor(max(1, min(n_folds, available_cores(), room)))
    with one_blas_thread(), _quiet_convergence():
        try:
            for f in range(n_folds):
                pool.submit(run, f)
            for i in range(len(grid)):
                yield {f: results[(f, i)].result() for f in range(n_folds)}
        finally:
            stopped.set()
            pool.shutdown(wait=True, cancel_futures=True)


def sklearn_refit(data: TrainSet, C: float, notes: list[str], rotate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The final model on all train codes at the chosen C: W (K, D), b (K,)."""
    with one_blas_thread(), _quiet_convergence():
        fc = fold_codes(data.features, data.y, rotate)
        return _fit_C(_estimator(), fc, len(data.classes), C, notes)
