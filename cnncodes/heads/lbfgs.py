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

Why preconditioned: CNN codes are strongly correlated (a few hundred directions hold most of the
variance), so the objective's curvature spans orders of magnitude, worst at large C, and plain
L-BFGS crawls (a development run, squared hinge on 10k x 2048 synthetic codes, C = 1e-5 ... 1: 22-269
iterations per C plain, 4-40 preconditioned). The two-loop recursion's initial inverse Hessian is
therefore gamma (S + mu I)^(-1) rather than gamma I, S the second moment of the codes with a ones
column and mu = lambda / c, c the loss's mean curvature in the scores at the start of each C
(`_curvature`): c S + lambda I approximates the Hessian of the penalised objective, so the first step
(gamma = 1 / c) is nearly a Newton step, and later gamma = s.y / y.H0 y as usual. This is L-BFGS on
the variables v = [W, b] (S + mu I)^(1/2) written in [W, b]: the optimum and the stopping rule are
unchanged. S (of at most PRECONDITION_ROWS rows) is eigendecomposed whole up to EXACT_COLUMNS columns,
beyond that estimated by a randomised SVD (its PRECONDITION_RANK leading directions, the rest at their mean
eigenvalue): a full eigendecomposition of a 2049 x 2049 matrix alone takes seconds on two cores.

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

The squared hinge, where that is affordable, goes by the finite Newton method instead (`_finite_newton`; Keerthi
and DeCoste 2005): each (model, class) is its own piecewise quadratic problem, whose Newton system (the generalised
Hessian: the rows on the loss's quadratic side) is factored directly in float64 (`_HingeNewton`: in the rows'
space by Woodbury from the Gram matrix, or in the codes' space), and each step is followed by the exact minimum
along it (`_squared_hinge_line`: along a line the derivative is piecewise linear). Why: with about as many
dimensions as rows (the digits' codes), the Hessian's spectrum splits into the rows on and off the quadratic side,
and a preconditioner shared by the classes cannot follow that split: PCG took ~400 products for one exact Newton
step, and its settled estimate (~17) gave steps that gained 10-30% each and a decrement up to 2.5x below the true
gap. The direct step is exact and so is its decrement; from the previous C's optimum a few steps meet the rule
(digits, C = 0.1 and 1: 5 and 4 steps, ending 3e-10 from float64 references), and the two fits the decrement by
PCG had said converged 1e-4 and 3e-4 above the optimum (tests/test_head_reference.py) now reach it. The rule is
the same, the decrement now exact, and it also waits (at most SIDES_STEPS steps) for a full Newton step that keeps
every row on its side of the kink: the objective is then the quadratic that step minimised, so it lands on the
optimum (without that wait, a 660 x 64 fit at C = 100 stopped 3e-5 above it, its decrement 1e-5: rows crossing
the kink). It runs from the start of a C where the direct solves cost at most DIRECT_HV Hessian-vector products
(small C, with nearly every row on the quadratic side, and large codes stay with L-BFGS and PCG): from an L-BFGS
iterate near the optimum, rows near the kink lie on both sides of it and the method took 9 steps, 4 from the
previous C's optimum. The duality gap at its natural dual point, |g|^2 / (2 lambda), is no stopping rule here
either: at a point 5e-8 above the optimum it was still 1e-5 of the objective.

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

import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..runtime import available_cores
from .names import LBFGS_MEMORY
from .rowspace import FoldCodes, fold_codes, one_blas_thread
from .torch_solver import (SMOOTH_HINGE_TAU, _cpu_threads, _cs_margins, _loss, _ovr_margins, _penalty_factors,
                           _stored_scale)

LBFGS_MAX_ITER = 1000  # iterations per C (warm-started from the previous C: tens are typical; the squared hinge at C = 100 with rows on its kink took up to 600)
LBFGS_RTOL = 3e-5  # stop when every model's estimated gap is below this fraction of its `_scale` (see above)
PRECONDITION_ROWS = 8192  # rows that estimate the codes' second moment for the preconditioner
PRECONDITION_RANK = 256  # its leading directions kept; the rest get their mean eigenvalue
EXACT_COLUMNS = 1025  # up to this many code dimensions (+1) S is eigendecomposed whole (a 1025^2 eigh: ~0.2 s)
ARMIJO = 1e-4  # sufficient decrease: f(w + a d) <= f(w) + ARMIJO a g.d
WOLFE_DELTA, WOLFE_SIGMA, WOLFE_EPS = 0.1, 0.9, 1e-6  # Hager-Zhang's approximate Wolfe conditions (their defaults)
MAX_BACKTRACKS = 30  # step halvings (or better) before the line search gives up
NEWTON_BELOW = 3.0  # L-BFGS's own gap estimate, in units of rtol, below which the Newton decrement is computed
SQUARED_HINGE_MARGIN = 3.0  # the squared hinge's rule is rtol / this (see lbfgs_path)
NEWTON_EVERY = 50  # ... or after this many L-BFGS iterations without a Newton check (large C: L-BFGS crawls)
NEWTON_ASKS_IN_FLOAT32 = 30  # Newton decrements that did not meet the rule, after which the fit goes on in float64
NEWTON_STALLED = 0.5  # ... or two in a row each above this fraction of the one before (little gained)
NEWTON_CG_ITER = 50  # conjugate-gradient iterations at most that estimate the Newton decrement
NEWTON_SETTLED = 0.01  # ... until the estimate's last rise is below this fraction of it
CURVATURE_EPS = 1e-8  # a pair (s, y) is kept when s.y > CURVATURE_EPS |s| |y|: float32 rounding, not curvature, below


class _Preconditioner:
    """The augmented codes' second moment S = [x, 1]^T [x, 1] / n, from a sample of rows: exactly (eigh in
    float64) up to EXACT_COLUMNS columns; beyond, its PRECONDITION_RANK leading directions (randomised SVD, seeded)
    and the mean of the remaining eigenvalues for the rest of the space. Kept and applied in float64: see
    `inverse`."""

    def __init__(self, x: torch.Tensor, rank: int = PRECONDITION_RANK, seed: int = 0):
        n = len(x)
        if n > PRECONDITION_ROWS:
            x = x[torch.as_tensor(np.random.default_rng(seed).choice(n, PRECONDITION_ROWS, replace=False), device=x.device)]
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        if xa.shape[1] <= EXACT_COLUMNS:  # every direction, the null ones included: no complement to scale
            xd = xa.double()
            top, self.vectors = torch.linalg.eigh(xd.T @ xd / len(xd))
            self.top, self.rest = top.clamp(min=0), 0.0
            return
        q = min(rank, *xa.shape)
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # the caller's generators untouched
            torch.manual_seed(seed)
            _, sv, vectors = torch.svd_lowrank(xa, q=q, niter=2)
        self.vectors = torch.linalg.qr(vectors.double())[0]  # orthonormal to float64 precision (svd_lowrank's: ~1e-6)
        self.top = sv.double().pow(2) / len(xa)
        rest = xa.shape[1] - q
        self.rest = float((xa.double().pow(2).sum() / len(xa) - self.top.sum()).clamp(min=0)) / rest if rest else 0.0

    def inverse(self, mu: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """r -> r (S + mu I)^-1 on r's last dimension (any leading ones), with S as estimated: V diag(1 / (top + mu)) V^T
        on the leading directions, 1 / (rest + mu) on their complement.

        Why float64: where the codes have (nearly) no variance, 1 / (rest + mu) reaches 1 / mu (up to 1e8), and the
        complement r - (r V) V^T cancels: in float32 its rounding (~1e-7 |r|) times 1 / mu outweighed the smallest true
        scale 1 / (top_max + mu) once mu < ~1e-5, and the operator turned indefinite (245 x 2048 codes at C = 100).
        In float64 that error is ~1e-16 / mu, far below it at every mu >= 1e-8; the input's dtype is returned."""
        v, f = self.vectors, 1.0 / (self.top + mu)
        c = 1.0 / (self.rest + mu) if v.shape[0] != v.shape[1] else 0.0  # V spans the whole space: no complement
        back = (f - c)[:, None] * v.T  # V diag(f) V^T + c (I - V V^T) = V diag(f - c) V^T + c I: two products

        def apply(rows: torch.Tensor) -> torch.Tensor:
            r = rows.double()
            out = (r @ v) @ back
            if c:
                out += c * r
            return out.to(rows.dtype)

        return apply


@dataclass
class Prepared:
    """What every C (and the refit) of one set of codes shares: the codes in the fit's basis on the device,
    their labels, and the preconditioner (None: plain L-BFGS)."""

    space: FoldCodes
    xt: torch.Tensor
    yt: torch.Tensor
    pre: _Preconditioner | None
    _x64: torch.Tensor | None = None
    _gram: torch.Tensor | None = None

    def gram(self) -> torch.Tensor:
        """The augmented codes' Gram matrix [x, 1] [x, 1]^T (n, n) in float64, made once, on demand (`_HingeNewton`)."""
        if self._gram is None:
            x = self.codes(torch.float64)
            self._gram = x @ x.T + 1.0
        return self._gram

    def codes(self, dtype: torch.dtype) -> torch.Tensor:
        """The codes in `dtype`: float32, or float64 for the fits float32 cannot finish (made once, on demand)."""
        if dtype == self.xt.dtype:
            return self.xt
        if self._x64 is None:
            self._x64 = self.xt.double()
        return self._x64


def prepare(x: np.ndarray, y: np.ndarray, device: str | torch.device = "cpu", precondition: bool = True) -> Prepared:
    """The codes as the fit sees them. Fewer rows than dimensions: in the row space of the codes (exact, see
    rowspace.fold_codes): every model's optimum lies in the span of all train rows, and a pass costs
    n x n, not n x D."""
    dev = torch.device(device)
    with one_blas_thread():  # the QR: numpy's BLAS threads beside other jobs cost 10-20x (rowspace.one_blas_thread)
        space = fold_codes(x, y)
    xt = torch.as_tensor(space.x, device=dev)
    with _cpu_threads(dev, xt.numel() * PRECONDITION_RANK):
        pre = _Preconditioner(xt) if precondition else None
    return Prepared(space, xt, torch.as_tensor(y, dtype=torch.long, device=dev), pre)


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


def _squared_hinge_hessian(x: torch.Tensor, y: torch.Tensor, wb: torch.Tensor, weights: torch.Tensor, lam: torch.Tensor
                           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> H v for the one-vs-rest squared hinge (intercept penalised), its generalised Hessian (Mangasarian):
    2 sum_i w_i [margin_i > 0] x_i x_i^T v + lambda v per class; cheaper than a double backward."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    with torch.no_grad():
        active = (_ovr_margins(_scores(x, wb), y) > 0).to(x.dtype)  # (M, n, K)
    coef = 2 * weights.to(x.dtype)[..., None] * active

    def hv(v: torch.Tensor) -> torch.Tensor:
        s = (v.reshape(-1, v.shape[-1]) @ xa.T).view(v.shape[0], v.shape[1], len(x)).transpose(1, 2)  # (M, n, K)
        return (coef * s).transpose(1, 2) @ xa + lam.to(v.dtype)[:, None, None] * v

    return hv


def _softmax_hessian(x: torch.Tensor, y: torch.Tensor, wb: torch.Tensor, weights: torch.Tensor, lam: torch.Tensor,
                     loss: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> H v for the softmax loss ("softmax") or the smoothed Crammer-Singer hinge ("smooth-hinge": tau times
    the log-sum-exp of the margins m_j = 1 + s_j - s_y over tau, m_y = 0), intercept unpenalised: with p the
    softmax, the loss's Hessian in its arguments is (diag(p) - p p^T) / tau; written out, one pass of two matrix
    products (a double backward costs about three)."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    tau = SMOOTH_HINGE_TAU if loss == "smooth-hinge" else 1.0
    with torch.no_grad():
        s = _scores(x, wb)
        p = torch.softmax((_cs_margins(s, y) if loss == "smooth-hinge" else s) / tau, dim=2)  # (M, n, K)
        at_y = y.view(1, -1, 1).expand(len(wb), len(x), 1)
    coef = weights.to(x.dtype)[..., None] / tau
    lam_v = lam.to(x.dtype)[:, None, None]

    def hv(v: torch.Tensor) -> torch.Tensor:
        ds = (v.reshape(-1, v.shape[-1]) @ xa.T).view(v.shape[0], v.shape[1], len(x)).transpose(1, 2)  # (M, n, K)
        if loss == "smooth-hinge":  # the margins move by ds_j - ds_y (0 at y)
            ds = ds - ds.gather(2, at_y)
        q = coef * p * (ds - (p * ds).sum(2, keepdim=True))
        if loss == "smooth-hinge":  # back to the scores: m_y is constant, every other m_j moves with -s_y
            q = q.scatter(2, at_y, 0.0)
            q = q.scatter(2, at_y, -q.sum(2, keepdim=True))
        out = q.transpose(1, 2) @ xa
        out[..., :-1] += lam_v * v[..., :-1]
        return out

    return hv


DIRECT_HV = 60  # a direct Newton solve is taken where it costs at most this many Hessian-vector products
SIDES_STEPS = 5  # finite Newton steps, once the rule holds, that wait for the rows to stay on their sides
FACTOR_BYTES = 1 << 28  # the direct solves keep the blocks' factors for reuse up to this many bytes (256 MiB)
GRAM_ROWS = 4096  # up to this many rows the direct solves keep the rows' Gram matrix (float64: 134 MB at most)


class _HingeNewton:
    """Exact Newton steps for the one-vs-rest squared hinge (intercept penalised), each (model, class) on its own:
    its generalised Hessian H = lambda I + 2 X_A^T diag(w_A) X_A (A: the rows on the loss's quadratic side, w their
    weights) factored directly, in float64: in the space of the rows, by Woodbury, H^-1 g = (g - X_A^T (Gamma +
    X_A X_A^T)^-1 X_A g) / lambda with Gamma = diag(lambda / (2 w_A)) and X_A X_A^T from the Gram matrix, or in the
    space of the codes (the (D + 1)^2 Hessian), whichever costs less. Used where that costs at most DIRECT_HV
    Hessian-vector products (CG takes tens to hundreds of them on these systems: their spectrum splits into the
    rows on and off the quadratic side, which no preconditioner shared by the classes can follow)."""

    def __init__(self, prepared: Prepared, weights: torch.Tensor, lam: torch.Tensor):
        self.p, self.weights, self.lam = prepared, weights, lam
        self.x = prepared.xt  # float32 for the cost estimate; float64 for the solves
        self.factors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # block -> (its rows, factor)
        self.held = 0  # their bytes, at most FACTOR_BYTES

    def _active(self, x: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Margins 1 - t s (M, n, K) and the rows on the quadratic side (rows outside a model's fit excluded)."""
        z = _ovr_margins(_scores(x, wb), self.p.yt)
        return z, (z > 0) & (self.weights > 0)[..., None]

    def sides(self, wb: torch.Tensor) -> torch.Tensor:
        """The rows on the loss's quadratic side at wb (M, n, K)."""
        with torch.no_grad():
            return self._active(self.p.codes(wb.dtype), wb)[1]

    def _costs(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flops, roughly, of each block's solve with `counts` rows on the quadratic side: (rows' space, codes' space).
        Without the Gram matrix (more than GRAM_ROWS rows) the rows' space forms its block of it."""
        n, d1, c = self.x.shape[0], self.x.shape[1] + 1, counts.double()
        return c.pow(3) / 3 + c.pow(2) * (1 if n <= GRAM_ROWS else d1), d1 ** 3 / 3 + c * d1 ** 2

    def _dual(self, counts: torch.Tensor) -> torch.Tensor:
        rows, codes = self._costs(counts)
        return rows < codes

    def affordable(self, wb: torch.Tensor) -> bool:
        """Whether the direct solves at wb cost at most DIRECT_HV Hessian-vector products."""
        with torch.no_grad():
            counts = self._active(self.x, wb.float())[1].sum(1)  # (M, K)
        n, d1 = self.x.shape[0], self.x.shape[1] + 1
        return bool(torch.minimum(*self._costs(counts)).sum() <= DIRECT_HV * 2 * n * d1 * counts.numel())

    def __call__(self, wb: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The Newton step -H^-1 g at wb (float64), every block solved exactly."""
        x = self.p.codes(torch.float64)
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        m, k, d1 = g.shape
        with torch.no_grad():
            active = self._active(x, wb)[1]
            dual = self._dual(active.sum(1))
            u = g / self.lam.to(g.dtype)[:, None, None]  # the primal blocks' overwritten below
            xg = (g.reshape(-1, d1) @ xa.T).view(m, k, len(x)) if bool(dual.any()) else None
            gram = self.p.gram() if bool(dual.any()) and len(x) <= GRAM_ROWS else None

            lock = threading.Lock()

            def factor(block: tuple[int, int], rows: torch.Tensor) -> torch.Tensor:
                """The block's system factored; the last one again where its rows are the same (a block settled
                on its rows while others still move: most of them, in a C's last steps)."""
                i, j = block
                last = self.factors.get(block)
                if last is not None and len(last[0]) == len(rows) and bool((last[0] == rows).all()):
                    return last[1]
                coef = 2 * self.weights[i, rows].to(x.dtype)
                if bool(dual[i, j]):  # H^-1 g = (g - X_A^T y) / lambda, (Gamma + G_AA) y = X_A g
                    system = gram[rows[:, None], rows] if gram is not None else xa[rows] @ xa[rows].T
                    system.diagonal().add_(float(self.lam[i]) / coef)
                else:  # the (D + 1)^2 Hessian
                    xr = xa[rows]
                    system = (xr.T * coef) @ xr
                    system.diagonal().add_(float(self.lam[i]))
                out = torch.linalg.cholesky(system)
                with lock:
                    size = out.numel() * out.element_size()
                    old = last[1].numel() * last[1].element_size() if last else 0
                    if last is not None or self.held + size <= FACTOR_BYTES:
                        self.factors[block] = rows, out
                        self.held += size - old
                return out

            def solve(block: tuple[int, int]) -> torch.Tensor:
                i, j = block
                rows = active[i, :, j].nonzero().squeeze(1)
                if bool(dual[i, j]):  # y
                    return torch.cholesky_solve(xg[i, j, rows][:, None], factor(block, rows))[:, 0]
                return torch.cholesky_solve(g[i, j][:, None], factor(block, rows))[:, 0]  # H^-1 g

            blocks = [(i, j) for i in range(m) for j in range(k)]
            # the blocks on the cores, one torch thread each: no barrier inside an operator to wait at
            workers = min(available_cores(), len(blocks))
            if workers > 1:
                with ThreadPoolExecutor(workers) as pool:
                    solved = list(pool.map(solve, blocks))
            else:
                solved = [solve(b) for b in blocks]
            y = torch.zeros_like(xg) if xg is not None else None
            for (i, j), out in zip(blocks, solved):
                if bool(dual[i, j]):
                    y[i, j, active[i, :, j]] = out
                else:
                    u[i, j] = out
            if y is not None:
                u -= (y.reshape(-1, len(x)) @ xa).view(m, k, d1) / self.lam.to(g.dtype)[:, None, None]
        return -u


def _finite_newton(objective: Callable, direct: _HingeNewton, line: Callable, w: torch.Tensor, rtol: float,
                   max_iter: int, at_zero: torch.Tensor) -> tuple[torch.Tensor, int, np.ndarray]:
    """The squared hinge by exact Newton steps (`_HingeNewton`), each followed by the exact line search along it,
    in float64: the finite Newton method (Keerthi and DeCoste 2005). It stops where `_minimise`'s rule holds, the
    decrement (here exact) and the decrease of the step after it both <= rtol, and the full Newton step kept every
    row on its side of the kink: the objective is then the quadratic the step minimised all along it, so the step
    lands on the optimum, which is returned. Where rows still cross (on the kink, where rounding decides), it stops
    on the rule alone after SIDES_STEPS more steps. Returns what `_minimise` returns."""
    w, nit, met = w.double(), 0, 0
    values, g = objective(w)
    while True:
        step = direct(w, g)
        gap = _relative(-(g * step), values, at_zero)
        if nit >= max_iter or np.isnan(gap).any():
            return w, nit, gap
        w_next = line(w, step)
        values_next, g_next = objective(w_next)
        nit += 1
        if np.all(gap <= rtol) and np.all(_relative_decrease(values, values_next, at_zero) <= rtol):
            met += 1
            if met > SIDES_STEPS or bool((direct.sides(w) == direct.sides(w + step)).all()):
                return (w_next, nit, gap) if bool(values_next.sum() <= values.sum()) else (w, nit - 1, gap)
        w, values, g = w_next, values_next, g_next


DENSE_FLOPS = 3e8  # softmax / smoothed hinge: the Hessian is written out and factored up to this cost (~30 ms)


class _DenseHessian:
    """The softmax or smoothed Crammer-Singer Hessian of every model written out, (K (D + 1))^2 each, and factored
    in float64: the Newton check's step and decrement exactly, where that is cheap (`affordable`). Per row the
    loss's Hessian in the scores is A = diag(p) - p p^T (softmax), or J^T (diag(p) - p p^T) J / tau in the margins
    (J their derivative in the scores: m_j = 1 + s_j - s_y, m_y = 0); summed against the augmented codes, plus lambda
    on W. The intercepts' common shift leaves the loss unchanged: it is held by adding 1 1^T to their block (the
    gradient is orthogonal to it), and a ridge of rounding size keeps that block definite where every row's softmax
    has saturated."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, wb: torch.Tensor, weights: torch.Tensor, lam: torch.Tensor,
                 loss: str):
        m, k, d1 = wb.shape
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        with torch.no_grad():
            s = _scores(x, wb.to(x.dtype))
            tau = SMOOTH_HINGE_TAU if loss == "smooth-hinge" else 1.0
            p = torch.softmax((_cs_margins(s, y) if loss == "smooth-hinge" else s) / tau, dim=2)  # (M, n, K)
            a = (torch.diag_embed(p) - p[..., :, None] * p[..., None, :]) / tau
            if loss == "smooth-hinge":  # J^T Q J, Q = a without row and column y (m_y is constant)
                hot = torch.nn.functional.one_hot(y, k).to(a.dtype)[None]  # (1, n, K)
                a = a * (1 - hot[..., :, None]) * (1 - hot[..., None, :])
                r = a.sum(3)
                a = (a - hot[..., :, None] * r[..., None, :] - r[..., :, None] * hot[..., None, :]
                     + r.sum(2)[..., None, None] * hot[..., :, None] * hot[..., None, :])
            a = a * weights.to(a.dtype)[..., None, None]
            hess = torch.einsum("mikl,ia,ib->mkalb", a, xa, xa).reshape(m, k * d1, k * d1)
            idx = torch.arange(k * d1, device=x.device)
            on_w = idx % d1 != d1 - 1
            hess[:, idx[on_w], idx[on_w]] += lam.to(a.dtype)[:, None]
            bias = idx[~on_w]
            ridge = 1e-12 * hess.abs().amax((1, 2))
            hess[:, bias[:, None], bias] += 1.0 + torch.eye(k, dtype=a.dtype, device=x.device) * ridge[:, None, None]
            self.factor = torch.linalg.cholesky(hess)

    @staticmethod
    def affordable(n: int, d: int, k: int, m: int) -> bool:
        """Whether writing out and factoring the M Hessians costs at most DENSE_FLOPS or DIRECT_HV products."""
        unknowns = k * (d + 1)
        cost = m * (k * k * n * (d + 1) ** 2 + unknowns ** 3 / 3)
        return cost <= max(DENSE_FLOPS, DIRECT_HV * 2 * n * (d + 1) * k * m)

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        """H^-1 g per model, in g's layout and dtype."""
        m, k, d1 = g.shape
        out = torch.cholesky_solve(g.reshape(m, k * d1, 1).to(self.factor.dtype), self.factor)
        return out.view(m, k, d1).to(g.dtype)


def _squared_hinge_line(x: torch.Tensor, y: torch.Tensor, wb: torch.Tensor, d: torch.Tensor, weights: torch.Tensor,
                        lam: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """wb + a d with a (M, K) minimising the one-vs-rest squared hinge (intercept penalised) along d exactly, each
    (model, class) on its own: the classes are independent problems, and along a line each is a convex piecewise
    quadratic, whose derivative is piecewise linear and nondecreasing. Its root from the rows' kinks sorted: on each
    piece between two kinks the derivative is linear, with sums over the rows on the quadratic side there (prefix
    and suffix sums over the sorted kinks), and the root is the one piece's own root that lies on it. `scores`:
    wb's, where they are at hand."""
    with torch.no_grad():
        z = _ovr_margins(_scores(x, wb) if scores is None else scores, y)  # (M, n, K): 1 - t s, > 0 where active
        sd = _scores(x, d)
        e = torch.full_like(sd, -1.0).scatter(2, y.view(1, -1, 1).expand(len(d), len(y), 1), 1.0) * sd  # z(a) = z - a e
        z, e = z.transpose(1, 2).double(), e.transpose(1, 2).double()  # (M, K, n)
        c = 2 * weights.double()[:, None, :]
        l = lam.double()[:, None]
        wd, dd = (wb * d).sum(2).double() * l, (d * d).sum(2).double() * l  # (M, K)
        # row i is on the quadratic side for a < z_i / e_i where e_i > 0, for a > z_i / e_i where e_i < 0
        kink = torch.where(e != 0, z / torch.where(e != 0, e, 1.0), torch.inf)
        kink, order = kink.sort(dim=2)
        zs, es, cs = z.gather(2, order), e.gather(2, order), c.expand_as(z).gather(2, order)
        rises = es > 0

        def side_sums(v: torch.Tensor) -> torch.Tensor:  # on piece j (between kinks j-1 and j): sum of v over its rows
            lead = torch.zeros_like(v[..., :1])
            up = torch.cat([lead, torch.where(rises, v, 0).cumsum(2)], dim=2)  # rising rows before kink j
            down = torch.cat([lead, torch.where(rises, 0, v).cumsum(2)], dim=2)
            return (up[..., -1:] - up) + down  # rising rows past the piece, falling ones before it

        intercept = wd[..., None] - side_sums(cs * zs * es)  # the derivative on piece j: intercept + a slope
        slope = dd[..., None] + side_sums(cs * es * es)
        root = -intercept / slope
        lower = torch.cat([torch.full_like(kink[..., :1], -torch.inf), kink], dim=2)
        upper = torch.cat([kink, torch.full_like(kink[..., :1], torch.inf)], dim=2)
        on_piece = (root >= lower) & (root <= upper) & torch.isfinite(root)
        first = on_piece.to(torch.uint8).argmax(2, keepdim=True)
        a = torch.where(on_piece.any(2), root.gather(2, first)[..., 0], 1.0)

        def along(a_: torch.Tensor) -> torch.Tensor:  # each block's objective at wb + a_ d, less its value at a_ = 0
            slack = (z - a_[..., None] * e).clamp(min=0)
            return (c / 2 * slack * slack).sum(2) + a_ * wd + a_ * a_ * dd / 2

        # rounding (a direction that is all but zero, a root on a nearly flat piece) must not cost an increase: the
        # best of the root, the full step and no step
        candidates = torch.stack([a, torch.ones_like(a), torch.zeros_like(a)])
        a = candidates.gather(0, torch.stack([along(t) for t in candidates]).argmin(0, keepdim=True))[0]
    return wb + a.to(wb.dtype)[..., None] * d


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


def _relative_decrease(values: torch.Tensor, values_next: torch.Tensor, at_zero: torch.Tensor) -> np.ndarray:
    """Per model: how much lower values_next is than values, over `_scale` (<= 0: not lower)."""
    return ((values - values_next) / _scale(values, at_zero).clamp(min=1e-300)).cpu().numpy()


def _scale(values: torch.Tensor, at_zero: torch.Tensor) -> torch.Tensor:
    """What a model's gap is measured against: the smaller of its objective and the decrease from W, b = 0 so far.
    The objective alone is too lax at small C, where it is nearly all the loss at 0 (log K for softmax) and the
    part W changes is ~C: a gap of 1e-4 of it left W far from its optimum (95% of val predictions agreeing)."""
    return torch.minimum(values, at_zero - values)


def _relative_value(value: torch.Tensor, values: torch.Tensor, at_zero: torch.Tensor) -> np.ndarray:
    """Per model: value (M,) over its `_scale`; inf where that is <= 0."""
    scale = _scale(values, at_zero)
    return torch.where(scale > 0, value.double() / scale, torch.inf).cpu().numpy()


def _relative(gh: torch.Tensor, values: torch.Tensor, at_zero: torch.Tensor) -> np.ndarray:
    """Per model: the sum of g (H g) over its unknowns, halved, over its `_scale` (M,); inf where that is <= 0."""
    scale = _scale(values, at_zero)
    gap = gh.double().sum(tuple(range(1, gh.dim()))) / (2 * scale)
    return torch.where(scale > 0, gap, torch.inf).cpu().numpy()


def _newton(hv: Callable | _DenseHessian, g: torch.Tensor, scale: torch.Tensor, precondition: Callable
            ) -> tuple[torch.Tensor, np.ndarray, bool, bool]:
    """Each model's relative Newton decrement g H^-1 g / (2 scale) (`_scale`) by preconditioned conjugate gradients on H u = g (each
    model its own system, all run at once), and the (truncated) Newton step -u.

    CG's g.u is a lower bound that rises towards g H^-1 g by alpha r.z each iteration; CG stops once every model's
    last rise was below NEWTON_SETTLED of it (the estimate has settled), also where it is already certain to exceed
    the rule: the step is then a Newton step worth taking. A `_DenseHessian` is solved exactly instead. Returns
    (step, relative decrements, all settled, precision floor reached: a curvature p H p that rounding made
    non-positive)."""
    dims = tuple(range(1, g.dim()))
    if isinstance(hv, _DenseHessian):  # the Hessian factored: the step and decrement exactly
        u = hv.solve(g)
        estimate = (g * u).double().sum(dims)
        return -u, torch.where(scale > 0, estimate / (2 * scale), torch.inf).cpu().numpy(), True, False

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).double().sum(dims).view(-1, *[1] * len(dims))

    u, r = torch.zeros_like(g), g.clone()
    z = precondition(r)
    p, rz = z, dot(r, z)
    estimate = torch.zeros_like(rz)
    scale = scale.view_as(rz)

    def relative() -> np.ndarray:
        return torch.where(scale > 0, estimate / (2 * scale), torch.inf).flatten().cpu().numpy()

    settled = torch.zeros_like(rz, dtype=torch.bool)
    for _ in range(NEWTON_CG_ITER):
        hp = hv(p)
        php = dot(p, hp)
        if not bool((php > 0).all() and torch.isfinite(php).all()):  # rounding at the working precision's floor
            return -u, relative(), False, True
        alpha = rz / php
        u, r = u + alpha.to(g.dtype) * p, r - alpha.to(g.dtype) * hp
        rise = alpha * rz  # = g.u_new - g.u in exact arithmetic
        estimate = estimate + rise
        settled = rise <= NEWTON_SETTLED * estimate
        if bool(settled.all()):
            break
        z = precondition(r)
        rz_new = dot(r, z)
        p, rz = z + (rz_new / rz).to(g.dtype) * p, rz_new
    return -u, relative(), bool(settled.all()), False


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
