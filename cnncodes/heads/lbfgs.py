"""Full-batch L-BFGS on codes in memory, C by C along the grid: every head whose train codes fit in memory.

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
the iterates, the memory and the line search stay on the codes' device in float32 (float64 once float32
cannot finish a fit, below).

Why preconditioned: see `precondition` (the initial inverse Hessian gamma (S + mu I)^-1, S the codes' second
moment).

The stopping rule: every model's objective f is within LBFGS_RTOL of its optimum, relative to
min(f, f(0) - f), as estimated by the Newton decrement g H^-1 g / 2 (Boyd and Vandenberghe, 9.5.1: f - f*
to second order, exactly for a quadratic), with H the exact Hessian (the squared hinge's generalised one,
Mangasarian's) through Hessian-vector products, g H^-1 g by preconditioned conjugate gradients (`_newton`).
Why this rule and not the others:
- An absolute gradient bound (this module's earlier rule, and scikit-learn's lbfgs tol) means less and less as C
  grows: the penalty's curvature 1 / (C n) is all that ties the gradient to the gap, so at C = 10 on 245 x 2048
  ants/bees codes svm stopped 56% above LinearSVC's objective, and logreg (scikit-learn's, at its default tol)
  2.3%, with the same 1e-4.
- A certified bound from strong convexity, |g|^2 / (2 lambda), or the duality gap of the natural dual point, is
  hopelessly loose at large C: 17x the objective at C = 100 on the same codes, where the true gap was 9e-5.
- L-BFGS's own estimate -g.d / 2 was 3-15x below the true gap: its curvature pairs miss directions.
The Newton decrement followed the true gap within 1.5x across the shapes of tests/test_head_reference.py
(float64 references). It is relative to min(f, f(0) - f), not to f alone: at small C the objective is nearly
all the loss at W = 0 (log K), and 1e-4 of it left W far from its optimum (95% of val predictions agreeing).
It is computed once L-BFGS's own estimate is within NEWTON_BELOW x the rule, or NEWTON_EVERY iterations after
the last check (at C = 1e4 on 50 x 2048 codes L-BFGS had crawled through its 1,000 iterations); where it is not
met, its Newton step is the next step. CG runs until its estimate settles even where the rule is certainly not
met, so that this step is a Newton step: cut at the first sign of "not converged" (2-5 products), the steps gained
little, and one C of the digits' svm (1,437 ResNet-50 codes) took 45 checks; settled, logreg's C's take 2-3.
Where the Hessian is small (`_DenseHessian`: K (D + 1) unknowns per model, written out and factored for at most
DENSE_FLOPS), the check solves it directly instead: CG's settled estimate had let a smoothed-hinge fit (660 x 64,
C = 100) stop 8e-5 above the optimum, 3e-7 so.

The squared hinge, where that is affordable, goes by the finite Newton method instead (`newton`).

L-BFGS's line search backtracks from the full step until Armijo's sufficient decrease holds or, where float32
rounding hides a decrease that small (close to the optimum), Hager and Zhang's approximate Wolfe conditions do (they
read the directional derivative, which float32 keeps accurate); the squared hinge's exact search is for the finite
Newton method only (in L-BFGS, whose full steps mostly pass, its sort and extra product cost more than they saved:
20,000 x 2048 codes, svm 20 -> 38 s). A line search that finds no step drops the curvature memory and tries again
from the preconditioned gradient; where float32 still finds none, where its rounding makes a curvature in the Newton
check non-positive, after NEWTON_ASKS_IN_FLOAT32 Newton checks short of the rule (rows flipping across the squared
hinge's kink on float32 rounding), or after two checks in a row that each gained less than half (the steps lost in
float32's rounding: that C = 1e4 fit then converged in 154 iterations), the fit goes on in float64 (the codes copied
once). Failing in float64 too, or at the iteration limit, the fit stops and is reported as not converged in `notes`
(the fit report's; `selection` then ranks no C from there on) or, without notes, as a ConvergenceWarning.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from .names import LBFGS_MEMORY
from .newton import (_DenseHessian, _finite_newton, _HingeNewton, _newton, _relative, _relative_decrease, _scale,
                     _softmax_hessian, _squared_hinge_hessian, _squared_hinge_line)
from .precondition import Prepared, prepare
from .torch_solver import (SMOOTH_HINGE_TAU, _cpu_threads, _cs_margins, _loss, _ovr_margins, _penalty_factors, _scores,
                           _stored_scale)

LBFGS_MAX_ITER = 1000  # iterations per C (warm-started from the previous C: tens are typical; the squared hinge at C = 100 with rows on its kink took up to 600)
LBFGS_RTOL = 3e-5  # stop when every model's estimated gap is below this fraction of its `_scale` (see above)
ARMIJO = 1e-4  # sufficient decrease: f(w + a d) <= f(w) + ARMIJO a g.d
WOLFE_DELTA, WOLFE_SIGMA, WOLFE_EPS = 0.1, 0.9, 1e-6  # Hager-Zhang's approximate Wolfe conditions (their defaults)
MAX_BACKTRACKS = 30  # step halvings (or better) before the line search gives up
NEWTON_BELOW = 3.0  # L-BFGS's own gap estimate, in units of rtol, below which the Newton decrement is computed
SQUARED_HINGE_MARGIN = 3.0  # the squared hinge's rule is rtol / this (see lbfgs_path)
NEWTON_EVERY = 50  # ... or after this many L-BFGS iterations without a Newton check (large C: L-BFGS crawls)
NEWTON_ASKS_IN_FLOAT32 = 30  # Newton decrements that did not meet the rule, after which the fit goes on in float64
NEWTON_STALLED = 0.5  # ... or two in a row each above this fraction of the one before (little gained)
CURVATURE_EPS = 1e-8  # a pair (s, y) is kept when s.y > CURVATURE_EPS |s| |y|: float32 rounding, not curvature, below


class PathFit(NamedTuple):
    """One C of `lbfgs_path`: W (M, K, D), b (M, K), the iterations run, and each model's estimated relative
    objective gap where the fit stopped (<= the tolerance: converged)."""

    w: np.ndarray
    b: np.ndarray
    iterations: int
    gap: np.ndarray
    rtol: float

    @property
    def converged(self) -> bool:
        return bool(np.all(self.gap <= self.rtol))


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
               device: str | torch.device = "cpu", max_iter: int | None = None, rtol: float | None = None,
               init: tuple[np.ndarray, np.ndarray] | None = None, precondition: bool = True,
               notes: list[str] | None = None, prepared: Prepared | None = None) -> Iterator[PathFit]:
    """Yield a `PathFit` (W (M, K, D), b (M, K), iterations, estimated relative gaps) at each C of `grid` (ascending), for the M
    models (model m skips rows with fold == heldout[m]). `init`: W, b to start the first C from (else zeros).
    A C whose fit stops short of `rtol` is said in `notes` (else warned; see the module docstring).
    `prepared`: `prepare(x, y, device, precondition)` made once for several calls on the same codes.

    Losses: "softmax" (LogisticRegression's objective), "hinge" (Crammer-Singer, fitted as "smooth-hinge"),
    "squared-hinge" (LinearSVC's: one-vs-rest squared hinge with the intercept penalised like a weight,
    liblinear's intercept_scaling=1), each plus ||W||^2 / (2 C n).
    """
    max_iter, rtol = max_iter or LBFGS_MAX_ITER, rtol or LBFGS_RTOL  # read here: tests and benches may set them
    p = prepared or prepare(x, y, device, precondition)
    xt, yt, space, dev = p.xt, p.yt, p.space, p.xt.device
    fit_loss = "smooth-hinge" if loss == "hinge" else loss
    # the squared hinge's decrement by PCG (its generalised Hessian) was up to 13x below the true gap where rows sit
    # on the kink (300 x 256 codes, 12 classes, C = 100): its rule is that much tighter (the direct solves' too)
    fit_rtol = rtol / SQUARED_HINGE_MARGIN if loss == "squared-hinge" else rtol
    penalise_bias = loss == "squared-hinge"
    scale_out = _stored_scale(loss, n_classes)
    m, k, d = len(heldout), n_classes, xt.shape[1]
    keep = torch.as_tensor(fold, device=dev)[None, :] != torch.as_tensor(heldout, device=dev)[:, None]
    weights = keep.double() / keep.sum(1, keepdim=True).clamp(min=1)  # (M, n): each model's mean over its rows
    rows = keep.sum(1).cpu().numpy().astype(np.float64)
    wb = torch.zeros(m, k, d + 1, device=dev)  # [W, b] of the last C, in the fit's basis
    if init is not None:
        w0 = init[0] if space.basis is None else init[0] @ space.basis  # into the row space (w lies in it)
        wb = torch.as_tensor(np.concatenate([w0, init[1][..., None]], axis=-1) / scale_out, dtype=torch.float32, device=dev)
    with _cpu_threads(dev, len(xt) * m * k * d):
        at_zero = None  # each model's objective at W, b = 0 (the penalty is 0 there: the same at every C)
        for C in grid:
            lam = torch.tensor(_penalty_factors(k, [C] * m, rows, loss), dtype=torch.float64, device=dev)
            wb = wb.float()  # each C starts in float32 (a float64 polish of the last C is kept, rounded)
            curvature = _curvature(xt, yt, wb, weights.float(), fit_loss)
            mu = float(lam.mean()) / curvature  # (S + mu I) c matches the Hessian c S + lambda I
            h0 = p.pre.inverse(mu) if p.pre else (lambda r: r / (1.0 + mu))  # standardised codes: S's mean diagonal ~ 1

            last_scores: list = [None, None]  # the last point `objective` saw and its scores (`line` reads them)

            def per_model(wb_: torch.Tensor) -> torch.Tensor:
                """Each model's objective (M,), its sums accumulated in float64 (a graph to wb_)."""
                w, b = wb_[..., :d], wb_[..., d]
                norm = w.pow(2).sum((1, 2)) + (b.pow(2).sum(1) if penalise_bias else 0)
                s = _scores(p.codes(wb_.dtype), wb_)
                last_scores[1] = s.detach()
                values = (_loss(s, yt, fit_loss).double() * weights).sum(1)
                return values + 0.5 * lam * norm.double()

            def objective(wb_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                """Each model's objective (M,) in float64 and the gradient in wb_'s dtype."""
                last_scores[0] = wb_
                wb_ = wb_.detach().requires_grad_()
                values = per_model(wb_)
                grad, = torch.autograd.grad(values.sum(), wb_)
                return values.detach(), grad

            dense = fit_loss != "squared-hinge" and p.pre is not None and _DenseHessian.affordable(len(xt), d, k, m)

            def hessian(wb_: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | _DenseHessian:
                """v -> H v, the objective's (generalised) Hessian at wb_, per model; or the Hessian itself."""
                if fit_loss == "squared-hinge":
                    return _squared_hinge_hessian(p.codes(wb_.dtype), yt, wb_, weights, lam)
                if dense:
                    return _DenseHessian(p.codes(torch.float64), yt, wb_, weights, lam, fit_loss)
                return _softmax_hessian(p.codes(wb_.dtype), yt, wb_, weights, lam, fit_loss)

            line = direct = None
            if fit_loss == "squared-hinge":
                def line(wb_: torch.Tensor, d_: torch.Tensor) -> torch.Tensor:
                    known = last_scores[1] if last_scores[0] is wb_ else None  # objective's, just made at wb_
                    return _squared_hinge_line(p.codes(wb_.dtype), yt, wb_, d_, weights, lam, known)

                direct = _HingeNewton(p, weights, lam) if p.pre else None  # precondition=False: plain L-BFGS

            if at_zero is None:
                at_zero = objective(torch.zeros_like(wb))[0]
            wb, nit, gap = _minimise(objective, hessian, wb, h0, 1.0 / curvature, fit_rtol, max_iter, at_zero, line,
                                     direct)
            if not np.all(gap <= fit_rtol):
                _not_converged(C, nit, max_iter, float(gap.max()), fit_rtol, notes)
            out = wb.cpu().double().numpy() * scale_out
            yield PathFit(space.to_codes(out[..., :d]), out[..., d], nit, gap, fit_rtol)  # float64: a polished fit stays so


def _minimise(objective: Callable, hessian: Callable, w: torch.Tensor, h0: Callable, gamma: float, rtol: float,
              max_iter: int, at_zero: torch.Tensor, line: Callable | None = None, direct: _HingeNewton | None = None
              ) -> tuple[torch.Tensor, int, np.ndarray]:
    """L-BFGS from w (M, K, D + 1) until every model's Newton decrement g H^-1 g / 2 is <= rtol times its `_scale`;
    (w, iterations, the relative decrements). H0 = gamma h0 (`h0` acts on the last dimension). The decrement is
    computed (`_newton`) once L-BFGS's own estimate -g.d / 2 is below the rule; where it is not, its Newton step is
    the next step. Where float32 finds no further decrease short of the rule, the iterate is promoted to float64 and
    the fit goes on. See the module docstring."""
    if direct is not None and direct.affordable(w):
        try:
            return _finite_newton(objective, direct, line, w, rtol, max_iter, at_zero)
        except torch.linalg.LinAlgError:  # a factorisation failed on rounding: L-BFGS and PCG instead
            pass
    values, g = objective(w)
    pairs: deque = deque(maxlen=LBFGS_MEMORY)  # (s, y, 1 / s.y)
    nit, gamma0, asked, last_ask, stalled, last_gap = 0, gamma, 0, 0, 0, np.inf
    while True:
        d = -_two_loop(g, pairs, lambda r: gamma * h0(r))
        gap = _relative(-(g * d), values, at_zero)
        # L-BFGS thinks it is near, or has crawled for NEWTON_EVERY iterations: ask Newton, whose step is the better one
        if np.all(gap <= NEWTON_BELOW * rtol) or nit - last_ask >= NEWTON_EVERY:
            last_ask = nit
            newton, newton_gap, settled, floor = _newton(hessian(w), g, _scale(values, at_zero),
                                                         lambda r: gamma0 * h0(r))
            if settled and np.all(newton_gap <= rtol):
                # the quadratic model says converged; its full step says what the model misses (rows crossing the
                # squared hinge's kink, where the model is not the function): a decrease beyond the rule is a
                # lower bound of the gap, so the fit goes on from there
                w_next = w + newton
                values_next, g_next = objective(w_next)
                lower = bool(values_next.sum() < values.sum())
                if np.all(_relative_decrease(values, values_next, at_zero) <= rtol):
                    return (w_next, nit + 1, newton_gap) if lower else (w, nit, newton_gap)
                if lower:
                    pairs, gamma = deque(maxlen=LBFGS_MEMORY), gamma0
                    w, values, g, nit = w_next, values_next, g_next, nit + 1
                    continue
                d, gap = newton, newton_gap
            asked += 1
            stalled = stalled + 1 if float(np.max(newton_gap)) > NEWTON_STALLED * last_gap else 0
            last_gap = float(np.max(newton_gap))
            if w.dtype == torch.float32 and (floor or asked >= NEWTON_ASKS_IN_FLOAT32 or stalled >= 2):
                # float32 cannot resolve the curvature left (or rows flip across the squared hinge's kink on its
                # rounding, and the decrement will not settle, or two checks in a row gained less than half: the
                # steps drown in float32's rounding, as at C = 1e4 on 50 x 2048 codes): go on in float64
                w, pairs, gamma = w.double(), deque(maxlen=LBFGS_MEMORY), gamma0
                values, g = objective(w)
                continue
            if not np.isnan(newton_gap).any() and bool(newton.abs().sum() > 0):
                d, gap = newton, newton_gap
        if nit >= max_iter or np.isnan(gap).any():
            return w, nit, gap
        step = _line_search(objective, w, float(values.sum()), g, d)
        if step is None:
            if pairs:  # a stale curvature memory can point badly: once more from the gradient
                pairs.clear()
                gamma = gamma0
            elif w.dtype == torch.float32:  # float32 rounding hides the decrease that is left: go on in float64
                w = w.double()
                values, g = objective(w)
            else:
                return w, nit, gap
            continue
        w_new, values, g_new = step
        s, y = w_new - w, g_new - g
        sy = float((s * y).sum())
        if sy > CURVATURE_EPS * float(s.norm() * y.norm()):  # always, in exact arithmetic (strictly convex)
            yhy = float((y * h0(y)).sum())
            pairs.append((s, y, 1.0 / sy))
            gamma = sy / yhy if yhy > 0 else gamma
        w, g, nit = w_new, g_new, nit + 1


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
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(w + a d, its values per model, its gradient) for the first step a = 1, 1/2 or less (quadratic interpolation)
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
        values_new, g_new = objective(w_new)
        f_new = float(values_new.sum())
        slope_new = float((g_new * d).sum())
        if f_new <= f + ARMIJO * a * slope or (
                f_new <= f + WOLFE_EPS * abs(f) and WOLFE_SIGMA * slope <= slope_new <= (2 * WOLFE_DELTA - 1) * slope):
            return w_new, values_new, g_new
        if not np.isfinite(f_new):
            a *= 0.1
            continue
        quadratic = -slope * a * a / (2 * (f_new - f - slope * a))  # minimum of the parabola through f, slope, f_new
        a = min(max(quadratic, 0.1 * a), 0.5 * a)
    return None


def _not_converged(C: float, nit: int, max_iter: int, gap: float, rtol: float, notes: list[str] | None) -> None:
    """Say that a C stopped short of the rule, and why: in `notes` (the fit report's), else as a ConvergenceWarning."""
    why = (f"iteration limit ({max_iter})" if nit >= max_iter else
           "line search failed in float64: no step decreased the objective along the search direction")
    message = (f"L-BFGS did not converge at C={C:g} after {nit} iterations ({why}; estimated relative objective gap "
               f"{gap:.2g}, tolerance {rtol:g})")
    if notes is not None:
        notes.append(message)
    else:
        from sklearn.exceptions import ConvergenceWarning

        warnings.warn(message, ConvergenceWarning, stacklevel=4)
