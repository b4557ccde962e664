"""The reference every head is held to: scikit-learn's objectives written out in float64, and
scikit-learn's own solvers run tightly (float64, tolerances far below the heads').

A head's objective is `mean loss + penalty / (2 C n)` on the standardised codes, which is
scikit-learn's `penalty / 2 + C * sum loss` divided by `C n`: the same minimiser, and a relative
gap that means the same thing in both forms.

- svm: LinearSVC's (one-vs-rest squared hinge, the intercept penalised like a weight); liblinear's
  solution and the head's are polished to the optimum by the finite Newton method (see `_polish`).
- logreg, linear: LogisticRegression's (multinomial softmax; binary: the logistic loss of one row).
- linear-svm: the smoothed Crammer-Singer hinge of `heads.torch_solver` (intercept free). scikit-learn
  has no solver for it (LinearSVC's crammer_singer is the unsmoothed hinge with a penalised
  intercept), so its reference is Newton's method on this objective in float64, its Hessian written
  out and factored (scipy's L-BFGS-B, to a gradient of 1e-12, where that matrix would be large).

The Newton solvers here are numpy, written apart from the heads' (torch) code, and each ends with a
certificate: the gradient of the objective as written out below at the rounding level.

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
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, np.float64)
    with threadpool_limits(1):  # numpy's BLAS threads beside the other test worker cost 10x, not save
        return _optimum(clf, x, y, n_classes, C, start)


def _optimum(clf: str, x: np.ndarray, y: np.ndarray, n_classes: int, C: float,
             start: tuple[np.ndarray, np.ndarray] | None) -> tuple[float, np.ndarray, np.ndarray]:
    z, basis = _row_space(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tight tol at large C may stop on max_iter: the polish goes on
        candidates = [_solve_in(clf, z, y, n_classes, C)]
        if clf == "svm":  # liblinear's own solution polished, so the reference does not depend on the head's
            candidates.append(_polish(clf, z, y, *candidates[0], C))
        if start is not None and clf in ("svm", "linear-svm"):
            candidates.append(_polish(clf, z, y, start[0] if basis is None else start[0] @ basis, start[1], C))
    value, coef, icpt = min(((objective(clf, z, y, c, i, C), c, i) for c, i in candidates), key=lambda t: t[0])
    return value, (coef if basis is None else coef @ basis.T), icpt


def _solve_in(clf: str, z: np.ndarray, y: np.ndarray, n_classes: int, C: float) -> tuple[np.ndarray, np.ndarray]:
    if clf == "svm":
        from sklearn.svm import LinearSVC

        # liblinear's primal Newton solver (dual=False; the dual coordinate descent crawls at large C) at its own
        # tolerance: tightened to 1e-10 it took 8 s on one case, stopped 20% above the optimum at C = 100 on
        # ants/bees codes, and its answer is polished to the optimum anyway (`optimum`)
        est = LinearSVC(C=C, max_iter=1000, dual=False).fit(z, y)
        return est.coef_, est.intercept_
    if clf in ("logreg", "linear"):
        from sklearn.linear_model import LogisticRegression

        est = LogisticRegression(C=C, tol=TIGHT, max_iter=100_000).fit(z, y)
        return est.coef_, est.intercept_
    return _solve_smooth_cs(z, y, n_classes, C, None, maxiter=3000)


def _polish(clf: str, z: np.ndarray, y: np.ndarray, coef: np.ndarray, icpt: np.ndarray, C: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """svm: each one-vs-rest row by the finite Newton method (`_squared_hinge_optimum`); linear-svm: the whole
    objective by Newton's method (`_solve_smooth_cs`)."""
    if clf == "linear-svm":
        return _solve_smooth_cs(z, y, max(2, coef.shape[0]), C, (coef, icpt))
    n = len(z)
    za, lam = np.hstack([z, np.ones((n, 1))]), 1.0 / (C * n)
    rows = np.hstack([coef, icpt[:, None]])
    for k in range(len(rows)):
        t = np.where(y == (1 if len(rows) == 1 else k), 1.0, -1.0)
        rows[k] = _squared_hinge_optimum(za, t, lam, rows[k])
    return rows[:, :-1], rows[:, -1]


def _exact_step(slack: np.ndarray, e: np.ndarray, wd: float, dd: float, c: float) -> float:
    """argmin over a of c sum(max(0, slack - a e)^2) / 2 + a wd + a^2 dd / 2: the root of its derivative
    wd + a dd - c sum over the rows with slack - a e > 0 of (slack - a e) e, piecewise linear between the rows'
    kinks slack / e; on each piece its own root, and the one that lies on its piece."""
    kinks = np.where(e != 0, slack / np.where(e != 0, e, 1.0), np.inf)
    order = np.argsort(kinks)
    kink, sl, es = kinks[order], slack[order], e[order]
    rises = es > 0  # such a row has positive slack below its kink, a falling one above it

    def side_sums(v: np.ndarray) -> np.ndarray:  # piece j lies between kinks j - 1 and j
        up = np.concatenate([[0.0], np.cumsum(np.where(rises, v, 0.0))])
        down = np.concatenate([[0.0], np.cumsum(np.where(rises, 0.0, v))])
        return (up[-1] - up) + down

    intercept = wd - c * side_sums(sl * es)
    slope = dd + c * side_sums(es * es)
    with np.errstate(divide="ignore", invalid="ignore"):
        root = -intercept / slope
    lower, upper = np.concatenate([[-np.inf], kink]), np.concatenate([kink, [np.inf]])
    found = np.flatnonzero((root >= lower) & (root <= upper))
    return float(root[found[0]]) if len(found) else 1.0


def _squared_hinge_optimum(za: np.ndarray, t: np.ndarray, lam: float, w: np.ndarray) -> np.ndarray:
    """argmin mean(max(0, 1 - t za w)^2) + lam |w|^2 / 2 from w: Newton steps on the generalised Hessian (the rows
    with positive slack), each followed by the exact minimum along it (the derivative along a line is piecewise
    linear: its root from the rows' kinks sorted). The objective is piecewise quadratic, so once the rows with
    positive slack are those of the optimum a step lands on it (Keerthi and DeCoste 2005); stops when a step
    changes nothing, and checks the gradient is at the rounding level."""
    n, d = za.shape

    def value(v: np.ndarray) -> float:
        return float((np.maximum(0.0, 1.0 - t * (za @ v)) ** 2).mean() + lam * (v @ v) / 2)

    def newton(v: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:  # (step, decrement, slack)
        slack = 1.0 - t * (za @ v)
        on = slack > 0
        grad = lam * v - 2.0 / n * za[on].T @ (t[on] * slack[on])
        step = -np.linalg.solve(2.0 / n * za[on].T @ za[on] + lam * np.eye(d), grad)
        return step, -(grad @ step) / 2, slack

    for _ in range(200):
        step, decrement, slack = newton(w)
        new = w + _exact_step(slack, t * (za @ step), lam * (w @ step), lam * (step @ step), 2.0 / n) * step
        if not value(new) < value(w):
            break
        w = new
    # the certificate: the exact Newton decrement (the gap, where the rows with positive slack stay so) at
    # float64's rounding level
    assert newton(w)[1] <= 1e-12 * value(w), "the finite Newton polish did not end at the optimum"
    return w


NEWTON_UNKNOWNS = 2000  # up to this many unknowns linear-svm's reference factors its Hessian (Newton's method)


def _solve_smooth_cs(z: np.ndarray, y: np.ndarray, k: int, C: float, start: tuple[np.ndarray, np.ndarray] | None,
                     maxiter: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """argmin of linear-svm's objective: from `start` by Newton's method where its Hessian is small (at most
    NEWTON_UNKNOWNS unknowns; from zero it would take tens of damped steps), else by scipy's L-BFGS-B for `maxiter`
    iterations."""
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
    if start is not None and k * (d + 1) <= NEWTON_UNKNOWNS:
        v = _smooth_cs_newton(z, y, k, lam, f, v0)
    else:
        v = minimize(f, v0, jac=True, method="L-BFGS-B",
                     options={"maxiter": maxiter, "maxfun": 2 * maxiter, "gtol": 1e-12, "ftol": 0.0, "maxcor": 30}).x
    w, b = v[:k * d].reshape(k, d), v[k * d:]
    return as_sklearn_rows(w, b)


def _smooth_cs_hessian(za: np.ndarray, y: np.ndarray, k: int, lam: float, v: np.ndarray) -> np.ndarray:
    """linear-svm's Hessian at v = [W (k, d) raveled, b (k)], in v's order: per row, J^T (diag(p) - p p^T) J / tau
    in the scores (p the softmax of the margins m_j = 1 + s_j - s_y over tau, J their derivative: m_y is 0), summed
    against the augmented codes za, plus lambda on W."""
    n, d1 = za.shape
    d, rows = d1 - 1, np.arange(n)
    w, b = v[:k * d].reshape(k, d), v[k * d:]
    scores = za @ np.hstack([w, b[:, None]]).T
    margins = 1.0 + scores - scores[rows, y][:, None]
    margins[rows, y] = 0.0
    p = np.exp((margins - margins.max(1, keepdims=True)) / SMOOTH_HINGE_TAU)
    p /= p.sum(1, keepdims=True)
    jac = np.broadcast_to(np.eye(k), (n, k, k)).copy()
    jac[rows, :, y] -= 1.0  # dm_j / ds = e_j - e_y ...
    jac[rows, y, :] = 0.0  # ... and m_y is constant
    inner = (p[:, :, None] * np.eye(k) - p[:, :, None] * p[:, None, :]) / SMOOTH_HINGE_TAU
    a = np.einsum("iak,iab,ibl->ikl", jac, inner, jac) / n
    blocks = np.zeros((k, d1, k, d1))
    for r in range(k):
        for c in range(r, k):
            blocks[r, :, c, :] = (za.T * a[:, r, c]) @ za
            blocks[c, :, r, :] = blocks[r, :, c, :].T
    blocks[np.arange(k), :d, np.arange(k), :d] += lam * np.eye(d)
    order = np.hstack([np.arange(k * d).reshape(k, d), k * d + np.arange(k)[:, None]]).ravel()  # (class, column) -> v
    hess = np.empty((k * d1, k * d1))
    hess[np.ix_(order, order)] = blocks.reshape(k * d1, k * d1)
    return hess


def _smooth_cs_newton(z: np.ndarray, y: np.ndarray, k: int, lam: float, f, v: np.ndarray) -> np.ndarray:
    """Newton's method with backtracking on linear-svm's objective `f` (value, gradient) from v (`_smooth_cs_hessian`).
    The intercepts move the margins only through their differences: their common shift, a flat direction, is held by
    adding 1 1^T to their block (the gradient is orthogonal to it). Stops where a step no longer lowers the objective,
    and checks the Newton decrement is then at float64's rounding level."""
    n, d = z.shape
    za = np.hstack([z, np.ones((n, 1))])
    shift = np.zeros(len(v))
    shift[k * d:] = 1.0

    def newton(v: np.ndarray) -> tuple[np.ndarray, float, float]:  # (step, decrement, value)
        value, grad = f(v)
        hess = _smooth_cs_hessian(za, y, k, lam, v) + np.outer(shift, shift)
        hess[k * d:, k * d:] += 1e-12 * np.eye(k) * np.abs(hess).max()  # where the margins saturate, b's curvature goes
        step = -np.linalg.solve(hess, grad)
        return step, -(grad @ step) / 2, value

    for _ in range(500):
        step, decrement, value = newton(v)
        if decrement <= 1e-15 * abs(value):
            break
        slope, a = -2 * decrement, 1.0
        while f(v + a * step)[0] > value + 1e-4 * a * slope and a > 1e-10:
            a /= 2
        if not f(v + a * step)[0] < value:
            break
        v = v + a * step
    assert newton(v)[1] <= 1e-12 * abs(newton(v)[2]), "Newton's method did not end at linear-svm's optimum"
    return v
