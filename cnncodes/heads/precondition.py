"""The L-BFGS path's preconditioner: the codes in the fit's basis and their second moment, shared by every C.

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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .rowspace import FoldCodes, fold_codes, one_blas_thread
from .torch_solver import _cpu_threads

PRECONDITION_ROWS = 8192  # rows that estimate the codes' second moment for the preconditioner
PRECONDITION_RANK = 256  # its leading directions kept; the rest get their mean eigenvalue
EXACT_COLUMNS = 1025  # up to this many code dimensions (+1) S is eigendecomposed whole (a 1025^2 eigh: ~0.2 s)


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
