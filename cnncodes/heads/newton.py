"""Newton's method on the heads' objectives: the Hessians, the Newton decrement that is `lbfgs`'s stopping rule
(`_newton`: by preconditioned conjugate gradients, or a small Hessian written out and factored), and the
squared hinge's finite Newton method with its exact line search.

The gaps are relative to `_scale`, min(f, f(0) - f): see `lbfgs` for the rule and why.

The squared hinge, where that is affordable, goes by the finite Newton method instead of L-BFGS (`_finite_newton`; Keerthi
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
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..runtime import available_cores
from .precondition import Prepared
from .torch_solver import SMOOTH_HINGE_TAU, _cs_margins, _ovr_margins, _scores

NEWTON_CG_ITER = 50  # conjugate-gradient iterations at most that estimate the Newton decrement
NEWTON_SETTLED = 0.01  # ... until the estimate's last rise is below this fraction of it


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
