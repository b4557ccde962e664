"""Full-batch L-BFGS on codes in memory, C by C along the grid: the torch heads in memory, and svm/logreg at scale.

codes (n, D) in memory + labels + fold ids -> per C: W (M, K, D), b (M, K) for M models at once.

Why L-BFGS: with the codes in memory the exact gradient costs one pass (two matrix products, on
every core), and the objectives are smooth or, for the squared hinge, have a continuous gradient,
so tens of quasi-Newton steps reach the optimum that thousands of Adam steps only approach. The M
models are independent, so one L-BFGS on the sum of their objectives solves them all; each C starts
from the previous C's optimum, and the caller may stop the path early. scipy's L-BFGS, not
torch.optim's: creating any torch.optim optimizer imports torch._dynamo (3-10 s).

Why preconditioned: CNN codes are strongly correlated (a few hundred directions hold most of the
variance), so the objective's curvature spans orders of magnitude, worst at large C, and plain
L-BFGS crawls (a development run, squared hinge on 10k x 2048 synthetic codes, C = 1e-5 ... 1: 22-269
iterations per C plain, 4-40 preconditioned).
L-BFGS therefore runs on v, where [W, b] = v (S + mu I)^(-1/2), S the second moment of the codes with
a ones column and mu = lambda / c, c the loss's mean curvature in the scores at the start of each C
(`_curvature`): the Hessian of the penalised objective, about c S + lambda I, becomes close to a
multiple of the identity. S is estimated by a randomised SVD (its PRECONDITION_RANK leading directions, the
rest at their mean eigenvalue) of at most PRECONDITION_ROWS rows: a full eigendecomposition of a
2049 x 2049 matrix alone takes seconds on two cores. This is only a change of variables: the
objective and its optimum are unchanged, and convergence is still judged on the gradient in W, b.

Why scipy's stop is not taken at its word: the rule is ours (largest gradient entry in W, b <= tol,
checked by the callback), and scipy may stop before it: at its iteration limit, when a line search
fails (no step decreases the float32 objective), or when f stops decreasing by its relative ftol,
both of which also happen at float32 precision close to the optimum. So every stop is judged by the
gradient at the point scipy returns (`_minimise`): within NEAR_OPTIMUM x tol it is accepted and
noted; farther (and not at the iteration limit), L-BFGS restarts once from there (a fresh curvature
memory, as scipy users do), and a stop still short of the rule is reported as not converged, with
scipy's status and message, in `notes` (the fit report's) or, without notes, as a ConvergenceWarning.
That restart matters: on ants/bees MobileNetV2 codes the `linear` head's fold models at C=1e-5 stopped
on scipy's ftol after 3 iterations, gradient 100x tol, and scored CV 0.943 where LogisticRegression's
optimum scores 0.927; restarted, they reach the rule 5 iterations later and score 0.927.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np
import scipy.optimize
import torch

from .sklearn_solver import fold_codes
from .torch_solver import (SMOOTH_HINGE_TAU, _cpu_threads, _cs_margins, _loss, _ovr_margins, _penalty_factors,
                           _stored_scale)

LBFGS_MAX_ITER = 300  # iterations per C (warm-started from the previous C: tens are typical)
LBFGS_TOL = 1e-4  # stop when every gradient entry (in W, b) of the summed objective is below this
PRECONDITION_ROWS = 8192  # rows that estimate the codes' second moment for the preconditioner
PRECONDITION_RANK = 256  # its leading directions kept; the rest get their mean eigenvalue
NEAR_OPTIMUM = 10.0  # a stop short of tol with the largest gradient entry within this factor of it: float32 precision
BUDGET_SPENT = 1  # scipy L-BFGS-B's status for its iteration (or evaluation) limit
LINE_SEARCH_FAILED = 2  # its status for "ABNORMAL" (no step satisfied the line search)


class _Preconditioner:
    """The leading eigenpairs of the augmented codes' second moment S = [x, 1]^T [x, 1] / n, from a sample of
    rows (randomised SVD, seeded), and the mean of the remaining eigenvalues for the rest of the space."""

    def __init__(self, x: torch.Tensor, rank: int = PRECONDITION_RANK, seed: int = 0):
        n = len(x)
        if n > PRECONDITION_ROWS:
            x = x[torch.as_tensor(np.random.default_rng(seed).choice(n, PRECONDITION_ROWS, replace=False), device=x.device)]
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        q = min(rank, *xa.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, sv, self.vectors = torch.svd_lowrank(xa, q=q, niter=2)
        self.top = sv.pow(2) / len(xa)
        rest = xa.shape[1] - q
        self.rest = float((xa.pow(2).sum() / len(xa) - self.top.sum()).clamp(min=0)) / rest if rest else 0.0

    def at(self, mu: float) -> tuple[Callable, Callable]:
        """x -> x A and x -> x A^-1 for rows x, A = (S + mu I)^(-1/2) (symmetric), with S as estimated."""
        v = self.vectors
        f, c = (self.top + mu).rsqrt(), (self.rest + mu) ** -0.5

        def apply(rows: torch.Tensor, f=f, c=c) -> torch.Tensor:
            proj = rows @ v
            return (proj * f) @ v.T + c * (rows - proj @ v.T)

        return apply, lambda rows: apply(rows, 1 / f, 1 / c)


def _scores(xt: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Scores (M, n, K) of the M models [W, b] = wb (M, K, D + 1) on the codes xt (n, D)."""
    m, k, d1 = wb.shape
    return (wb[..., :-1].reshape(m * k, d1 - 1) @ xt.T).view(m, k, len(xt)).transpose(1, 2) + wb[:, None, :, -1]


def _curvature(xt: torch.Tensor, yt: torch.Tensor, wb: torch.Tensor, weights: torch.Tensor, loss: str) -> float:
    """The loss's second derivative in the scores, averaged over rows, classes and models, at [W, b] = wb:
    the c in the Hessian approximation c S + lambda I that the preconditioner matches (one forward pass)."""
    with torch.no_grad():
        s = _scores(xt, wb)
        if loss == "squared-hinge":
            per_row = 2 * (_ovr_margins(s, yt) > 0).float().mean(2)
        else:  # softmax: p (1 - p); smoothed hinge: the same of softmax(margins / tau), over tau
            tau = SMOOTH_HINGE_TAU if loss == "smooth-hinge" else 1.0
            p = torch.softmax((_cs_margins(s, yt) if loss == "smooth-hinge" else s) / tau, dim=2)
            per_row = (p * (1 - p)).mean(2) / tau
        return max(float((per_row * weights).sum() / len(wb)), 1e-6)


def lbfgs_path(x: np.ndarray, y: np.ndarray, n_classes: int, fold: np.ndarray, heldout: np.ndarray, grid, loss: str, *,
               device: str | torch.device = "cpu", max_iter: int = LBFGS_MAX_ITER, tol: float = LBFGS_TOL,
               init: tuple[np.ndarray, np.ndarray] | None = None, precondition: bool = True,
               notes: list[str] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield W (M, K, D), b (M, K) and the iterations run at each C of `grid` (ascending), for the M models
    (model m skips rows with fold == heldout[m]). `init`: W, b to start the first C from (else zeros).
    A C whose fit stops short of `tol` is said in `notes` (else warned; see the module docstring).

    Losses: "softmax" (LogisticRegression's objective), "hinge" (Crammer-Singer, fitted as "smooth-hinge"),
    "squared-hinge" (LinearSVC's: one-vs-rest squared hinge with the intercept penalised like a weight,
    liblinear's intercept_scaling=1), each plus ||W||^2 / (2 C n).
    """
    dev = torch.device(device)
    fit_loss = "smooth-hinge" if loss == "hinge" else loss
    penalise_bias = loss == "squared-hinge"
    scale_out = _stored_scale(loss, n_classes)
    m, k = len(heldout), n_classes
    # Fewer rows than dimensions: fit in the row space of the codes (exact, see sklearn_solver.fold_codes):
    # every model's optimum lies in the span of all train rows, and a pass costs n x n, not n x D.
    space = fold_codes("logreg", x, y)
    d = space.x.shape[1]
    xt = torch.as_tensor(space.x, device=dev)
    yt = torch.as_tensor(y, dtype=torch.long, device=dev)
    keep = torch.as_tensor(fold, device=dev)[None, :] != torch.as_tensor(heldout, device=dev)[:, None]
    weights = keep.float() / keep.sum(1, keepdim=True).clamp(min=1)  # (M, n): each model's mean over its rows
    rows = keep.sum(1).cpu().numpy().astype(np.float64)
    wb = torch.zeros(m, k, d + 1, device=dev)  # [W, b] of the last C, in the fit's basis
    if init is not None:
        w0 = init[0] if space.basis is None else init[0] @ space.basis  # into the row space (w lies in it)
        wb = torch.as_tensor(np.concatenate([w0, init[1][..., None]], axis=-1) / scale_out, dtype=torch.float32, device=dev)
    with _cpu_threads(dev, len(x) * m * k * d):
        pre = _Preconditioner(xt) if precondition else None
        for C in grid:
            lam_np = _penalty_factors(k, [C] * m, rows, loss)
            lam = torch.tensor(lam_np, dtype=torch.float32, device=dev)
            # (S + mu I) matches the Hessian c S + lambda I when mu = lambda / c, c the loss's mean curvature at the start
            a, a_inv = pre.at(float(lam_np.mean()) / _curvature(xt, yt, wb, weights, fit_loss)) if pre else (None, None)
            last = {}  # the last point evaluated: its gradient's largest entry in W, b, and its result

            def to_wb(flat: torch.Tensor) -> torch.Tensor:
                v = flat.view(m * k, d + 1)
                return (v if a is None else a(v)).view(m, k, d + 1)

            def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
                if last and np.array_equal(flat, last["x"]):
                    return last["result"]
                t = torch.tensor(flat, dtype=torch.float32, device=dev, requires_grad=True)
                full = to_wb(t)
                full.retain_grad()
                w, b = full[..., :d], full[..., d]
                norm = w.pow(2).sum((1, 2)) + (b.pow(2).sum(1) if penalise_bias else 0)
                value = (_loss(_scores(xt, full), yt, fit_loss) * weights).sum() + 0.5 * (lam * norm).sum()
                value.backward()
                last.update(x=flat.copy(), grad=float(full.grad.abs().max()),
                            result=(float(value.detach()), t.grad.double().cpu().numpy()))
                return last["result"]

            x0 = (wb.view(m * k, d + 1) if a is None else a_inv(wb.view(m * k, d + 1))).reshape(-1).double().cpu().numpy()
            x, nit = _minimise(objective, x0, last, tol, max_iter, f"C={C:g}", notes)
            with torch.no_grad():
                wb = to_wb(torch.as_tensor(x, dtype=torch.float32, device=dev))
            out = wb.cpu().numpy() * scale_out
            yield space.to_codes(out[..., :d]).astype(np.float32), out[..., d].astype(np.float32), nit


def _minimise(objective: Callable, x0: np.ndarray, last: dict, tol: float, max_iter: int, where: str,
              notes: list[str] | None) -> tuple[np.ndarray, int]:
    """scipy's L-BFGS-B from x0 until `last["grad"]` (the largest gradient entry in W, b of the point last
    evaluated) is <= tol; (x, iterations). A stop short of tol is judged by that gradient at the x scipy
    returns: near the optimum accepted (noted once); far from it (not at the iteration limit), one restart;
    still short, noted as not converged (or warned without `notes`)."""

    def converged(intermediate_result) -> None:  # the stopping rule in W, b, whatever basis L-BFGS runs in
        if last["grad"] <= tol:
            raise StopIteration

    objective(x0)  # a start that already meets the rule (C moved little) takes no step; L-BFGS reuses it
    x, nit, res = x0, 0, None
    while last["grad"] > tol and nit < max_iter:
        restart = res is not None
        res = scipy.optimize.minimize(objective, x, jac=True, method="L-BFGS-B", callback=converged,
                                      options={"maxiter": max_iter - nit, "gtol": 0.0, "maxcor": 20})
        x, nit = res.x, nit + int(res.nit)
        objective(x)  # judge the point scipy returns (after a failed line search, not the last one tried)
        if restart or res.status == BUDGET_SPENT or last["grad"] <= NEAR_OPTIMUM * tol:
            break  # else scipy stopped far from the rule (line search, ftol): once more, fresh memory
    if last["grad"] > tol:
        _short_of_tol(res, last["grad"], tol, nit, max_iter, where, notes)
    return x, nit


def _short_of_tol(res, grad: float, tol: float, nit: int, max_iter: int, where: str, notes: list[str] | None) -> None:
    """Say why L-BFGS stopped before its rule: accepted near the optimum (not at the iteration limit), else
    not converged."""
    why = (f"iteration limit ({max_iter})" if nit >= max_iter else
           "line search failed" if res.status == LINE_SEARCH_FAILED else "no further decrease of the float32 objective")
    found = f"largest gradient entry {grad:.2g}, tolerance {tol:g}; scipy: {res.message.strip()} (status {res.status})"
    near = grad <= NEAR_OPTIMUM * tol and nit < max_iter
    if near:  # common (scipy's ftol or line search at float32 precision): one note per fit
        message = (f"L-BFGS: where scipy stopped within {NEAR_OPTIMUM:g}x the gradient tolerance {tol:g} (no further "
                   f"decrease of the float32 objective, or its line search failed there) the fit is accepted")
    else:
        message = f"L-BFGS did not converge at {where} after {nit} iterations ({why}: {found})"
    if notes is not None:
        notes.append(message)
    elif not near:
        from sklearn.exceptions import ConvergenceWarning

        warnings.warn(message, ConvergenceWarning, stacklevel=4)
