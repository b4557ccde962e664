"""The reference every head is held to: scikit-learn's objectives written out in float64, and
scikit-learn's own solvers run tightly (float64, tolerances far below the heads').

A head's objective is `mean loss + penalty / (2 C n)` on the standardised codes, which is
scikit-learn's `penalty / 2 + C * sum loss` divided by `C n`: the same minimiser, and a relative
gap that means the same thing in both forms.

- svm: LinearSVC's (one-vs-rest squared hinge, the intercept penalised like a weight); liblinear's
  solution is polished (see `_polish`).
- logreg, linear: LogisticRegression's (multinomial softmax; binary: the logistic loss of one row).
- linear-svm: the smoothed Crammer-Singer hinge of `heads.torch_solver` (intercept free). scikit-learn
  has no solver for it (LinearSVC's crammer_singer is the unsmoothed hinge with a penalised
  intercept), so its reference is scipy's L-BFGS-B on this objective in float64, run to a gradient
  of 1e-12.

Codes with fewer rows than dimensions are fitted in their row space (w = sum a_i x_i at every
optimum of an L2-penalised linear model): the same optimum, found in n x n instead of n x D.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import logsumexp

from cnncodes.heads import as_class_rows
from cnncodes.heads.torch_solver import SMOOTH_HINGE_TAU

TIGHT = 1e-10  # the scikit-learn solvers' tol here (the heads ship 1e-4-level rules)


def objective(clf: str, x: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, C: float) -> float:
    """The head's objective at (coef, intercept) in scikit-learn's layout (binary: one row), float64."""
    x, coef, intercept = (np.asarray(a, np.float64) for a in (x, coef, intercept))
    n, binary = len(x), coef.shape[0] == 1
    if clf == "svm":
        scores = x @ coef.T + intercept
        sign = np.where(y[:, None] == 1, 1.0, -1.0) if binary else np.where(
            np.arange(coef.shape[0])[None, :] == y[:, None], 1.0, -1.0)
        loss = np.square(np.maximum(0.0, 1.0 - sign * scores)).sum(1)
        return float(loss.mean() + ((coef ** 2).sum() + (intercept ** 2).sum()) / (2 * C * n))
    if clf in ("logreg", "linear"):
        scores = x @ coef.T + intercept
        if binary:
            loss = np.logaddexp(0.0, -np.where(y == 1, 1.0, -1.0) * scores[:, 0])
        else:
            loss = logsumexp(scores, axis=1) - scores[np.arange(n), y]
        return float(loss.mean() + (coef ** 2).sum() / (2 * C * n))
    if clf == "linear-svm":
        w, b = as_class_rows(coef, intercept)  # binary: [-w/2, w/2], the rows the solver's penalty sees
        return float(_smooth_cs(x, y, w, b)[0] + (2.0 if binary else 1.0) * (w ** 2).sum() / (2 * C * n))
    raise ValueError(clf)


def _smooth_cs(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean smoothed Crammer-Singer hinge and its gradient in the scores."""
    n, tau = len(x), SMOOTH_HINGE_TAU
    scores = x @ w.T + b
    margins = 1.0 + scores - scores[np.arange(n), y][:, None]
    margins[np.arange(n), y] = 0.0
    lse = logsumexp(margins / tau, axis=1)
    p = np.exp(margins / tau - lse[:, None])
    grad = p.copy()
    grad[np.arange(n), y] -= p.sum(1)
    return float(tau * lse.mean()), grad / n


def _row_space(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(codes in an orthonormal basis of their row span, the basis (D, n)) when n < D, else (x, None)."""
    if len(x) >= x.shape[1]:
        return x, None
    q, r = np.linalg.qr(x.T)
    return r.T, q


def optimum(clf: str, x: np.ndarray, y: np.ndarray, n_classes: int, C: float,
            start: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """The reference optimum: (objective, coef, intercept on the codes) of the lowest of scikit-learn's solution
    (scipy's for linear-svm) and, for the hinge losses, `start` (a head's own solution) polished by L-BFGS-B in
    float64 until it cannot go lower. Polishing can only lower the reference, so it never makes a head's gap look
    smaller; it is what makes the reference tight where liblinear is not (it stops on a gradient relative to its
    first: at C = 100 on ants/bees ResNet-50 codes 20% above the optimum)."""
    x = np.asarray(x, np.float64)
    z, basis = _row_space(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tight tol at large C may stop on max_iter: the polish goes on
        candidates = [_solve_in(clf, z, y, n_classes, C)]
        if start is not None and clf in ("svm", "linear-svm"):
            candidates.append(_polish(clf, z, y, start[0] if basis is None else start[0] @ basis, start[1], C))
    value, coef, icpt = min(((objective(clf, z, y, c, i, C), c, i) for c, i in candidates), key=lambda t: t[0])
    return value, (coef if basis is None else coef @ basis.T), icpt


def _solve_in(clf: str, z: np.ndarray, y: np.ndarray, n_classes: int, C: float) -> tuple[np.ndarray, np.ndarray]:
    if clf == "svm":
        from sklearn.svm import LinearSVC

        # liblinear's primal Newton solver (dual=False; the dual coordinate descent crawls at large C)
        est = LinearSVC(C=C, tol=TIGHT, max_iter=10_000, dual=False).fit(z, y)
        return est.coef_, est.intercept_
    if clf in ("logreg", "linear"):
        from sklearn.linear_model import LogisticRegression

        est = LogisticRegression(C=C, tol=TIGHT, max_iter=100_000).fit(z, y)
        return est.coef_, est.intercept_
    return _solve_smooth_cs(z, y, n_classes, C, None, maxiter=3000)


def _polish(clf: str, z: np.ndarray, y: np.ndarray, coef: np.ndarray, icpt: np.ndarray, C: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """svm: each one-vs-rest row by L-BFGS-B on its squared hinge; linear-svm: the whole objective."""
    from scipy.optimize import minimize

    if clf == "linear-svm":
        return _solve_smooth_cs(z, y, max(2, coef.shape[0]), C, (coef, icpt))
    n = len(z)
    za, lam = np.hstack([z, np.ones((n, 1))]), 1.0 / (C * n)
    rows = np.hstack([coef, icpt[:, None]])
    for k in range(len(rows)):
        t = np.where(y == (1 if len(rows) == 1 else k), 1.0, -1.0)

        def f(w):
            slack = np.maximum(0.0, 1.0 - t * (za @ w))
            return (slack ** 2).mean() + 0.5 * lam * w @ w, -2.0 / n * za.T @ (t * slack) + lam * w

        rows[k] = minimize(f, rows[k], jac=True, method="L-BFGS-B",
                           options={"maxiter": 5_000, "maxfun": 10_000, "gtol": 1e-15, "ftol": 0.0, "maxcor": 50}).x
    return rows[:, :-1], rows[:, -1]


def _solve_smooth_cs(z: np.ndarray, y: np.ndarray, k: int, C: float, start: tuple[np.ndarray, np.ndarray] | None,
                     maxiter: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import minimize

    from cnncodes.heads import as_sklearn_rows

    n, d = z.shape
    lam = (2.0 if k == 2 else 1.0) / (C * n)

    def f(v):
        w, b = v[:k * d].reshape(k, d), v[k * d:]
        loss, gs = _smooth_cs(z, y, w, b)
        grad = np.concatenate([(gs.T @ z + lam * w).ravel(), gs.sum(0)])
        return loss + 0.5 * lam * (w ** 2).sum(), grad

    if start is None:
        v0 = np.zeros(k * (d + 1))
    else:
        w0, b0 = as_class_rows(*start)
        v0 = np.concatenate([w0.ravel(), b0])
    v = minimize(f, v0, jac=True, method="L-BFGS-B",
                 options={"maxiter": maxiter, "maxfun": 2 * maxiter, "gtol": 1e-12, "ftol": 0.0, "maxcor": 30}).x
    w, b = v[:k * d].reshape(k, d), v[k * d:]
    return as_sklearn_rows(w, b)

