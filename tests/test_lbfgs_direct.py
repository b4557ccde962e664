"""The pieces of `heads.newton` that replace automatic differentiation or iteration by exact formulas: the softmax
and smoothed-hinge Hessian-vector products and Hessians written out, the squared hinge's exact line search and its
direct Newton step, each against the plain computation it stands for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnncodes.heads import newton
from cnncodes.heads.lbfgs import lbfgs_path
from cnncodes.heads.precondition import prepare
from cnncodes.heads.rowspace import FoldCodes
from cnncodes.heads.torch_solver import _loss, _ovr_margins, _scores


def _problem(n: int, d: int, k: int, m: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    y[:k] = torch.arange(k)
    wb = 0.3 * torch.randn(m, k, d + 1, generator=g, dtype=torch.float64)
    weights = torch.rand(m, n, generator=g, dtype=torch.float64)
    weights[0, : n // 4] = 0  # rows outside model 0's fit, as a fold model has
    weights /= weights.sum(1, keepdim=True)
    lam = 0.01 + torch.rand(m, generator=g, dtype=torch.float64)
    return x, y, wb, weights, lam


def _objective(x, y, wb, weights, lam, loss, penalise_bias):
    w = wb if penalise_bias else wb[..., :-1]
    return (_loss(_scores(x, wb), y, loss) * weights).sum(1) + 0.5 * lam * w.pow(2).sum((1, 2))


@pytest.mark.parametrize("loss", ["softmax", "smooth-hinge"])
@pytest.mark.parametrize("k", [2, 5])
def test_explicit_hessian_vector_products_equal_double_backward(loss, k):
    x, y, wb, weights, lam = _problem(40, 7, k)
    w = wb.clone().requires_grad_()
    grad, = torch.autograd.grad(_objective(x, y, w, weights, lam, loss, False).sum(), w, create_graph=True)
    v = torch.randn_like(wb)
    expected, = torch.autograd.grad((grad * v).sum(), w)
    got = newton._softmax_hessian(x, y, wb, weights, lam, loss)(v)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["softmax", "smooth-hinge"])
@pytest.mark.parametrize("k", [2, 4])
def test_the_written_out_hessian_inverts_the_hessian_vector_product(loss, k):
    """`_DenseHessian` (the Newton check's exact solve on small problems) against the products CG uses, off the
    intercepts' common shift (a flat direction of both losses, held fixed by the solve)."""
    x, y, wb, weights, lam = _problem(40, 6, k)
    wb = wb / 3  # softmax far from saturation: the Hessian well conditioned, so the check is tight
    v = torch.randn_like(wb)
    v[..., -1] -= v[..., -1].mean(1, keepdim=True)
    hv = newton._softmax_hessian(x, y, wb, weights, lam, loss)(v)
    torch.testing.assert_close(newton._DenseHessian(x, y, wb, weights, lam, loss).solve(hv), v, rtol=1e-6, atol=1e-7)


def test_the_squared_hinge_line_search_finds_each_blocks_minimum():
    x, y, wb, weights, lam = _problem(60, 5, 4, m=4)
    d = torch.randn_like(wb)
    out = newton._squared_hinge_line(x, y, wb, d, weights, lam)
    step = ((out - wb) * d).sum(2) / (d * d).sum(2)  # each (model, class) moved along its own d by this much
    torch.testing.assert_close(out, wb + step[..., None] * d)
    grid = torch.linspace(-3, 3, 6001, dtype=torch.float64)
    z = _ovr_margins(_scores(x, wb), y)  # (M, n, K)
    e = z - _ovr_margins(_scores(x, wb + d), y)  # the margins' change per unit step (exact: float64)

    def along(a: torch.Tensor) -> torch.Tensor:  # (M, K, len(a)): each block's objective at wb + a d
        slack = (z[..., None] - a * e[..., None]).clamp(min=0)
        penalty = (wb[..., None] + a * d[..., None]).pow(2).sum(2)
        return (weights[:, :, None, None] * slack * slack).sum(1) + 0.5 * lam[:, None, None] * penalty

    best = along(grid).min(2).values
    at_step = torch.stack([along(step[i, j].view(1))[i, j, 0] for i in range(4) for j in range(4)]).view(4, 4)
    assert bool((at_step <= best + 1e-12).all())


@pytest.mark.parametrize("n, d, gram_rows", [(30, 80, 4096), (30, 80, 10), (200, 6, 4096)])
def test_the_direct_newton_step_solves_each_blocks_generalised_hessian(monkeypatch, n, d, gram_rows):
    """Rows' space with the Gram matrix (n < d), without it (too many rows for it), and the codes' space (n > d)."""
    monkeypatch.setattr(newton, "GRAM_ROWS", gram_rows)
    x, y, wb, weights, lam = _problem(n, d, 3)
    prepared = prepare(x.float().numpy(), y.numpy())
    prepared._x64 = x  # the exact codes, so the check is in float64 throughout
    prepared.xt = x.float()
    if prepared.space.basis is not None:  # keep the codes as given (no row-space rotation) for this check
        prepared.space = FoldCodes(x.float().numpy(), y.numpy())
    g = torch.randn_like(wb)
    step = newton._HingeNewton(prepared, weights, lam)(wb, g)
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    active = _ovr_margins(_scores(x, wb), y) > 0
    for i in range(wb.shape[0]):
        for j in range(wb.shape[1]):
            coef = 2 * weights[i] * active[i, :, j]
            hessian = (xa.T * coef) @ xa + lam[i] * torch.eye(d + 1, dtype=x.dtype)
            torch.testing.assert_close(step[i, j], -torch.linalg.solve(hessian, g[i, j]), rtol=1e-8, atol=1e-10)


def test_the_finite_newton_path_reaches_the_squared_hinge_optimum():
    """From zero and along C, the direct steps end at the optimum: the gradient is rounding, every model converged."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 120)).astype(np.float32)
    y = rng.integers(0, 3, 90)
    fold = np.arange(90) % 3
    grid = [0.01, 1.0, 100.0]
    for C, fit in zip(grid, lbfgs_path(x, y, 3, fold, np.array([0, 1, -1]), grid, "squared-hinge", notes=[])):
        assert fit.converged and fit.iterations <= 12
        for m, held in enumerate([0, 1, -1]):
            rows = fold != held
            xa = np.hstack([x[rows], np.ones((rows.sum(), 1))]).astype(np.float64)
            wb = np.hstack([fit.w[m], fit.b[m][:, None]])
            t = np.where(y[rows][:, None] == np.arange(3), 1.0, -1.0)
            slack = np.maximum(0, 1 - t * (xa @ wb.T))
            grad = -2 * (t * slack).T @ xa / rows.sum() + wb / (C * rows.sum())
            assert np.abs(grad).max() <= 1e-6 * np.abs(wb).max() / (C * rows.sum())
