"""The in-memory heads: scikit-learn `LinearSVC` (svm) and `LogisticRegression` (logreg) along the C grid,
one job per fold (logreg, warm-started path) or per (fold, C) (svm), in threads.

standardised codes in memory + fold ids -> {fold: (W (G, K, D), b (G, K))}.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from . import codes
from .codes import SKLEARN_BYTES_PER_VALUE, TrainSet
from .format import as_class_rows

def _sklearn_estimator(clf: str, seed: int, shape: tuple[int, int]):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if clf == "svm":
        # Dual coordinate descent while n is within a few D (3x faster than the primal solver that
        # dual="auto" picks for n > D on 2k x 2k codes); primal (TRON) for n >> D, where dual crawls.
        return LinearSVC(C=1.0, dual=bool(shape[0] <= 4 * shape[1]), max_iter=5000, random_state=seed)
    return LogisticRegression(C=1.0, max_iter=1000, warm_start=True)


def _one_blas_thread():
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


def sklearn_path(clf: str, x: np.ndarray, y: np.ndarray, n_classes: int, Cs: Sequence[float], seed: int,
                  notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """W (G, K, D), b (G, K) for each C (ascending: logreg warm-starts from the previous C)."""
    w = np.zeros((len(Cs), n_classes, x.shape[1]))
    b = np.full((len(Cs), n_classes), -1e30)  # a class absent from a fold is never predicted
    present = np.unique(y)
    if len(present) < 2:
        b[:, present] = 0.0
        return w, b
    est = _sklearn_estimator(clf, seed, x.shape)
    for i, C in enumerate(Cs):
        est.set_params(C=float(C)).fit(x, y)
        # Read from the estimator, not from a warnings.catch_warnings: this runs in pool threads
        # and warning filters are process-wide (the caller silences the printed warning).
        if np.max(est.n_iter_) >= est.max_iter:
            notes.append(f"{clf} did not fully converge at C={C:g}")
        coef, icpt = as_class_rows(est.coef_, est.intercept_)
        w[i][est.classes_] = coef
        b[i][est.classes_] = icpt
    return w, b



def sklearn_folds(clf: str, data: TrainSet, fold: np.ndarray, n_folds: int, grid: Sequence[float], seed: int,
                   notes: list[str]) -> dict:
    """{fold: (W (G, K, D), b (G, K))}, jobs in parallel threads (liblinear and lbfgs release the GIL).

    logreg: one warm-started C path per fold; svm (no warm start in liblinear): one job per (fold, C).
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..data import available_cores

    dtype = np.float64 if clf == "svm" else np.float32  # liblinear copies anything else to float64, per fit

    def run(f: int, cs: list[float]):  # the fold copy is made inside the job: at most `workers` exist at once
        keep = fold != f
        return sklearn_path(clf, np.ascontiguousarray(data.features[keep], dtype=dtype), data.y[keep], K, cs, seed, notes)

    jobs = []
    for f in range(n_folds):
        jobs += [(f, [c]) for c in grid] if clf == "svm" else [(f, list(grid))]
    K = len(data.classes)
    room = max(1, codes.available_memory() // max(SKLEARN_BYTES_PER_VALUE[clf][1] * data.features.size, 1))
    with _one_blas_thread(), _quiet_convergence(), ThreadPoolExecutor(max(1, min(len(jobs), available_cores(), room))) as pool:
        done = [(f, pool.submit(run, f, cs)) for f, cs in jobs]
        results = [(f, job.result()) for f, job in done]
    return {f: (np.concatenate([w for g, (w, _) in results if g == f]), np.concatenate([b for g, (_, b) in results if g == f]))
            for f in range(n_folds)}



def sklearn_refit(clf: str, data: TrainSet, C: float, seed: int, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The final model on all train codes at the chosen C: W (K, D), b (K,)."""
    x = np.ascontiguousarray(data.features, dtype=np.float64 if clf == "svm" else np.float32)
    with _one_blas_thread(), _quiet_convergence():
        w, b = sklearn_path(clf, x, data.y, len(data.classes), [C], seed, notes)
    return w[0], b[0]
