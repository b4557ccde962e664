"""The codes as a solver fits them: in the row space of the codes when there are fewer rows than dimensions.

standardised codes (n, D) -> `FoldCodes` (x (n, r), labels, basis (D, r) or None) -> weights mapped back to D.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Fit in the row space of the codes when there are fewer rows than this fraction of the code dimension.
ROTATE_BELOW = 0.75


def one_blas_thread():
    """numpy's BLAS on one thread (a context manager): the QR of the codes gains nothing from threads, and on busy
    cores the threads' hand-offs cost 10-20x."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


@dataclass
class FoldCodes:
    """Training codes as the solver sees them: x (n, r), labels, and the basis (D, r) they are expressed in
    (None: x are the standardised codes themselves, r = D)."""

    x: np.ndarray
    y: np.ndarray
    basis: np.ndarray | None = None

    def to_codes(self, w: np.ndarray) -> np.ndarray:
        """Weights (..., r) in the basis -> weights (..., D) on the standardised codes."""
        return w if self.basis is None else w @ self.basis.T


def fold_codes(features: np.ndarray, y: np.ndarray, rotate: bool = True) -> FoldCodes:
    """The codes a solver fits, in the row space of `features` when it has fewer rows than dimensions.

    Why it is exact: with an L2 penalty on w and a loss that sees the codes only through
    x_i . w, the optimum lies in the span of the rows (w = sum a_i x_i), so fitting on
    z = x Q, where Q (D, n) is an orthonormal basis of that span (QR of x^T, z = R^T), and mapping
    back w = w_z Q^T gives the same model (the same objective at every w in the span); a pass costs
    n x n instead of n x D.
    """
    n, d = features.shape
    if not rotate or n >= ROTATE_BELOW * d:
        return FoldCodes(np.ascontiguousarray(features, dtype=np.float32), y)
    import torch  # its LAPACK (MKL): 0.27 s for the digits' 2048 x 1437 codes, numpy's (OpenBLAS) 0.44 s

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as numpy's (one_blas_thread)
    try:
        q, r = torch.linalg.qr(torch.as_tensor(np.asarray(features, dtype=np.float64)).T)  # x^T = Q R: x = R^T Q^T
    finally:
        torch.set_num_threads(threads)
    return FoldCodes(np.ascontiguousarray(r.T.numpy(), dtype=np.float32), y, q.numpy())
