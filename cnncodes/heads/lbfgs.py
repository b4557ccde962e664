"""Full-batch L-BFGS on codes in memory, C by C along the grid: the torch heads in memory, and svm/logreg at scale.

codes (n, D) in memory + labels + fold ids -> per C: W (M, K, D), b (M, K) for M models at once.

Why L-BFGS: with the codes in memory the exact gradient costs one pass (two matrix products, on
every core), and the objectives are smooth or, for the squared hinge, have a continuous gradient,
so tens of quasi-Newton steps reach the optimum that thousands of Adam steps only approach. The M
models are independent, so one L-BFGS on the sum of their objectives solves them all; each C starts
from the previous C's optimum, and the caller may stop the path early.

Why our own L-BFGS (`_minimise`, the textbook two-loop recursion, Nocedal & Wright alg. 7.4/7.5) and not
scipy's L-BFGS-B or torch.optim.LBFGS: scipy keeps its 2 x memory vectors in float64 on the host and its
bound-constrained update cost 4-5 ms per iteration on the 72k unknowns of five 10-class fold models of
1,437 digits (a quarter of the svm C search, more than the objective's matrix products), and every point
crossed to numpy and back; torch.optim's constructor imports torch._dynamo (1.2 s, more than a fit). Here
the iterates, the memory and the line search stay on the codes' device in float32.

Why preconditioned: CNN codes are strongly correlated (a few hundred directions hold most of the
variance), so the objective's curvature spans orders of magnitude, worst at large C, and plain
L-BFGS crawls (a development run, squared hinge on 10k x 2048 synthetic codes, C = 1e-5 ... 1: 22-269
iterations per C plain, 4-40 preconditioned). The two-loop recursion's initial inverse Hessian is
therefore gamma (S + mu I)^(-1) rather than gamma I, S the second moment of the codes with a ones
column and mu = lambda / c, c the loss's mean curvature in the scores at the start of each C
(`_curvature`): c S + lambda I approximates the Hessian of the penalised objective, so the first step
(gamma = 1 / c) is nearly a Newton step, and later gamma = s.y / y.H0 y as usual. This is L-BFGS on
the variables v = [W, b] (S + mu I)^(1/2) written in [W, b]: the optimum and the stopping rule are
unchanged. S is estimated by a randomised SVD (its PRECONDITION_RANK leading directions, the rest at
their mean eigenvalue) of at most PRECONDITION_ROWS rows: a full eigendecomposition of a 2049 x 2049
matrix alone takes seconds on two cores.

The stopping rule: the largest entry of the summed objective's gradient in W, b <= tol, or the
iteration limit. The line search backtracks from the full step until Armijo's sufficient decrease
holds or, where float32 rounding hides a decrease that small (close to the optimum), Hager and Zhang's
approximate Wolfe conditions do (they read the directional derivative, which float32 keeps accurate).
A line search that finds no step drops the curvature memory and tries again from the preconditioned
gradient; failing there too, the fit stops: accepted and noted once within NEAR_OPTIMUM x tol (float32
precision), else reported as not converged in `notes` (the fit report's) or, without notes, as a
ConvergenceWarning. Stops short of the rule are never taken at face value: on ants/bees MobileNetV2
codes a solver that stopped on a small relative decrease left the `linear` head's fold models at 100x
the tolerance, scoring CV 0.943 where LogisticRegression's optimum scores 0.927.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .names import LBFGS_MEMORY
from .sklearn_solver import FoldCodes, fold_codes
from .torch_solver import (SMOOTH_HINGE_TAU, _cpu_threads, _cs_margins, _loss, _ovr_margins, _penalty_factors,
                           _stored_scale)

LBFGS_MAX_ITER = 300  # iterations per C (warm-started from the previous C: tens are typical)
LBFGS_TOL = 1e-4  # stop when every gradient entry (in W, b) of the summed objective is below this
PRECONDITION_ROWS = 8192  # rows that estimate the codes' second moment for the preconditioner
PRECONDITION_RANK = 256  # its leading directions kept; the rest get their mean eigenvalue
NEAR_OPTIMUM = 10.0  # a stop short of tol with the largest gradient entry within this factor of it: float32 precision
ARMIJO = 1e-4  # sufficient decrease: f(w + a d) <= f(w) + ARMIJO a g.d
WOLFE_DELTA, WOLFE_SIGMA, WOLFE_EPS = 0.1, 0.9, 1e-6  # Hager-Zhang's approximate Wolfe conditions (their defaults)
MAX_BACKTRACKS = 30  # step halvings (or better) before the line search gives up
CURVATURE_EPS = 1e-8  # a pair (s, y) is kept when s.y > CURVATURE_EPS |s| |y|: float32 rounding, not curvature, below


class _Preconditioner:
    """The leading eigenpairs of the augmented codes' second moment S = [x, 1]^T [x, 1] / n, from a sample of
    rows (randomised SVD, seeded), and the mean of the remaining eigenvalues for the rest of the space."""

    def __init__(self, x: torch.Tensor, rank: int = PRECONDITION_RANK, seed: int = 0):
        n = len(x)
        if n > PRECONDITION_ROWS:
            x = x[torch.as_tensor(np.random.default_rng(seed).choice(n, PRECONDITION_ROWS, replace=False), device=x.device)]
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        q = min(rank, *xa.shape)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # the caller's generators untouched
            torch.manual_seed(seed)
            _, sv, vectors = torch.svd_lowrank(xa, q=q, niter=2)
        # orthonormal to float32 precision (svd_lowrank's are off by ~1e-6): the complement I - V V^T is scaled by
        # 1 / (rest + mu), up to 1e4-1e8, and that error made (S + mu I)^-1 indefinite at small mu
        self.vectors = torch.linalg.qr(vectors.double())[0].to(x.dtype)
        self.top = sv.pow(2) / len(xa)
        rest = xa.shape[1] - q
        self.rest = float((xa.pow(2).sum() / len(xa) - self.top.sum()).clamp(min=0)) / rest if rest else 0.0

    def inverse(self, mu: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """r -> r (S + mu I)^-1 on r's last dimension (any leading ones), with S as estimated: V diag(1 / (top + mu)) V^T on the leading directions,
        1 / (rest + mu) on their complement. Written as the two parts, not as c I plus a correction on V: with
        small mu, c = 1 / (rest + mu) is huge and the correction's cancellation in float32 made the operator
        indefinite (codes of <= 256 dims, where V spans everything and rest = 0)."""
        v, f = self.vectors, 1.0 / (self.top + mu)
        if self.vectors.shape[0] == self.vectors.shape[1]:  # V spans the whole space: no complement
            return lambda rows: ((rows @ v) * f) @ v.T
        c = 1.0 / (self.rest + mu)

        def apply(rows: torch.Tensor) -> torch.Tensor:
            proj = rows @ v
            return (proj * f) @ v.T + c * (rows - proj @ v.T)

        return apply


@dataclass
class Prepared:
    """What every C (and the refit) of one set of codes shares: the codes in the fit's basis on the device,
    their labels, and the preconditioner (None: plain L-BFGS)."""

    space: FoldCodes
    xt: torch.Tensor
    yt: torch.Tensor
    pre: _Preconditioner | None


def prepare(x: np.ndarray, y: np.ndarray, device: str | torch.device = "cpu", precondition: bool = True) -> Prepared:
    """The codes as the fit sees them. Fewer rows than dimensions: in the row space of the codes (exact, see
    sklearn_solver.fold_codes): every model's optimum lies in the span of all train rows, and a pass costs
    n x n, not n x D."""
    dev = torch.device(device)
    space = fold_codes(x, y)
    xt = torch.as_tensor(space.x, device=dev)
    with _cpu_threads(dev, xt.numel() * PRECONDITION_RANK):
        pre = _Preconditioner(xt) if precondition else None
    return Prepared(space, xt, torch.as_tensor(y, dtype=torch.long, device=dev), pre)


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
               notes: list[str] | None = None, prepared: Prepared | None = None,
               ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield W (M, K, D), b (M, K) and the iterations run at each C of `grid` (ascending), for the M models
    (model m skips rows with fold == heldout[m]). `init`: W, b to start the first C from (else zeros).
    A C whose fit stops short of `tol` is said in `notes` (else warned; see the module docstring).
    `prepared`: `prepare(x, y, device, precondition)` made once for several calls on the same codes.

    Losses: "softmax" (LogisticRegression's objective), "hinge" (Crammer-Singer, fitted as "smooth-hinge"),
    "squared-hinge" (LinearSVC's: one-vs-rest squared hinge with the intercept penalised like a weight,
    liblinear's intercept_scaling=1), each plus ||W||^2 / (2 C n).
    """
    p = prepared or prepare(x, y, device, precondition)
    xt, yt, space, dev = p.xt, p.yt, p.space, p.xt.device
    fit_loss = "smooth-hinge" if loss == "hinge" else loss
    penalise_bias = loss == "squared-hinge"
    scale_out = _stored_scale(loss, n_classes)
    m, k, d = len(heldout), n_classes, xt.shape[1]
    keep = torch.as_tensor(fold, device=dev)[None, :] != torch.as_tensor(heldout, device=dev)[:, None]
    weights = keep.float() / keep.sum(1, keepdim=True).clamp(min=1)  # (M, n): each model's mean over its rows
    rows = keep.sum(1).cpu().numpy().astype(np.float64)
    wb = torch.zeros(m, k, d + 1, device=dev)  # [W, b] of the last C, in the fit's basis
    if init is not None:
        w0 = init[0] if space.basis is None else init[0] @ space.basis  # into the row space (w lies in it)
        wb = torch.as_tensor(np.concatenate([w0, init[1][..., None]], axis=-1) / scale_out, dtype=torch.float32, device=dev)
    with _cpu_threads(dev, len(xt) * m * k * d):
        for C in grid:
            lam_np = _penalty_factors(k, [C] * m, rows, loss)
            lam = torch.tensor(lam_np, dtype=torch.float32, device=dev)
            curvature = _curvature(xt, yt, wb, weights, fit_loss)
            mu = float(lam_np.mean()) / curvature  # (S + mu I) c matches the Hessian c S + lambda I
            h0 = p.pre.inverse(mu) if p.pre else (lambda r: r / (1.0 + mu))  # standardised codes: S's mean diagonal ~ 1

            def objective(wb_: torch.Tensor) -> tuple[float, torch.Tensor]:
                wb_ = wb_.detach().requires_grad_()
                w, b = wb_[..., :d], wb_[..., d]
                norm = w.pow(2).sum((1, 2)) + (b.pow(2).sum(1) if penalise_bias else 0)
                value = (_loss(_scores(xt, wb_), yt, fit_loss).double() * weights).sum() + 0.5 * (lam * norm).sum()
                grad, = torch.autograd.grad(value, wb_)
                return float(value.detach()), grad

            wb, nit = _minimise(objective, wb, h0, 1.0 / curvature, tol, max_iter, f"C={C:g}", notes)
            out = wb.cpu().numpy() * scale_out
            yield space.to_codes(out[..., :d]).astype(np.float32), out[..., d].astype(np.float32), nit


def _minimise(objective: Callable, w: torch.Tensor, h0: Callable, gamma: float, tol: float, max_iter: int, where: str,
              notes: list[str] | None) -> tuple[torch.Tensor, int]:
    """L-BFGS from w (M, K, D + 1) until the largest gradient entry is <= tol; (w, iterations). H0 = gamma h0
    (`h0` acts on the last dimension); see the module docstring for the line search and for stops short of tol."""
    f, g = objective(w)
    grad = float(g.abs().max())
    pairs: deque = deque(maxlen=LBFGS_MEMORY)  # (s, y, 1 / s.y)
    nit, gamma0 = 0, gamma
    while not grad <= tol and nit < max_iter:  # a NaN gradient is not convergence
        d = -_two_loop(g, pairs, lambda r: gamma * h0(r))
        step = _line_search(objective, w, f, g, d)
        if step is None:
            if not pairs or grad <= NEAR_OPTIMUM * tol:
                break  # no decrease along the preconditioned gradient itself, or float32 precision reached
            pairs.clear()  # a stale curvature memory can point badly: once more from the gradient
            gamma = gamma0
            continue
        w_new, f, g_new = step
        s, y = w_new - w, g_new - g
        sy = float((s * y).sum())
        if sy > CURVATURE_EPS * float(s.norm() * y.norm()):  # always, in exact arithmetic (strictly convex)
            yhy = float((y * h0(y)).sum())
            pairs.append((s, y, 1.0 / sy))
            gamma = sy / yhy if yhy > 0 else gamma
        w, g, nit = w_new, g_new, nit + 1
        grad = float(g.abs().max())
    if not grad <= tol:
        _short_of_tol(grad, tol, nit, max_iter, where, notes)
    return w, nit


def _two_loop(g: torch.Tensor, pairs: deque, h0: Callable) -> torch.Tensor:
    """H g for the L-BFGS inverse-Hessian approximation H built from `pairs` on the initial H0 = h0."""
    q, alphas = g.clone(), []
    for s, y, rho in reversed(pairs):
        a = rho * (s * q).sum()
        q -= a * y
        alphas.append(a)
    r = h0(q)
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        r += (a - rho * (y * r).sum()) * s
    return r


def _line_search(objective: Callable, w: torch.Tensor, f: float, g: torch.Tensor, d: torch.Tensor
                 ) -> tuple[torch.Tensor, float, torch.Tensor] | None:
    """(w + a d, its value, its gradient) for the first step a = 1, 1/2 or less (quadratic interpolation)
    meeting Armijo's condition or the approximate Wolfe conditions; None if no step does. The approximate
    conditions are allowed from the first iteration (Hager and Zhang switch to them only near convergence):
    they can accept an increase of at most WOLFE_EPS |f|, and only where the slope along d has shrunk as at
    a line minimum; convergence is judged on the gradient anyway."""
    slope = float((g * d).sum())
    if not slope < 0:
        return None  # not a descent direction (float32 rounding of a vanishing gradient)
    a = 1.0
    for _ in range(MAX_BACKTRACKS):
        w_new = w + a * d
        f_new, g_new = objective(w_new)
        slope_new = float((g_new * d).sum())
        if f_new <= f + ARMIJO * a * slope or (
                f_new <= f + WOLFE_EPS * abs(f) and WOLFE_SIGMA * slope <= slope_new <= (2 * WOLFE_DELTA - 1) * slope):
            return w_new, f_new, g_new
        if not np.isfinite(f_new):
            a *= 0.1
            continue
        quadratic = -slope * a * a / (2 * (f_new - f - slope * a))  # minimum of the parabola through f, slope, f_new
        a = min(max(quadratic, 0.1 * a), 0.5 * a)
    return None


def _short_of_tol(grad: float, tol: float, nit: int, max_iter: int, where: str, notes: list[str] | None) -> None:
    """Say why L-BFGS stopped before its rule: accepted near the optimum (not at the iteration limit), else
    not converged."""
    why = (f"iteration limit ({max_iter})" if nit >= max_iter else
           "line search failed: no step decreased the objective along the search direction")
    near = grad <= NEAR_OPTIMUM * tol and nit < max_iter
    if near:  # common (float32 precision close to the optimum): one note per fit
        message = (f"L-BFGS: where no step decreased the float32 objective within {NEAR_OPTIMUM:g}x the gradient "
                   f"tolerance {tol:g} the fit is accepted")
    else:
        message = (f"L-BFGS did not converge at {where} after {nit} iterations ({why}; largest gradient entry "
                   f"{grad:.2g}, tolerance {tol:g})")
    if notes is not None:
        notes.append(message)
    elif not near:
        from sklearn.exceptions import ConvergenceWarning

        warnings.warn(message, ConvergenceWarning, stacklevel=4)
