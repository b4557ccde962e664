"""The torch heads' minibatch solver: M linear models (folds x C) trained at once by Adam on streamed blocks;
and the losses and penalties shared with the full-batch solver (`lbfgs`). The Adam solver as a scikit-learn
estimator, `TorchLinearClassifier`, is in `estimator` (scikit-learn is imported there only: a second of start-up
that `fit-head` does not need).

codes (h5 dataset or array) + labels + fold ids -> W (M, K, D), b (M, K).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .codes import BLOCK_BYTES, PIECE_ROWS, iter_blocks

# L-BFGS fits the hinge head on a smoothed Crammer-Singer hinge, tau * log(1 + sum_j exp((1 + s_j - s_y) / tau)):
# smooth (L-BFGS needs gradients that do not jump), never below the hinge and at most tau * log(K) above it.
SMOOTH_HINGE_TAU = 0.05

def train_torch(features, y: np.ndarray, n_classes: int, fold: np.ndarray, heldout: np.ndarray, Cs: np.ndarray,
                 loss: str, *, mean=None, scale=None, epochs: int | None = None, batch_size: int = 256,
                 lr: float = 0.01, device: str | torch.device = "cpu", seed: int = 0,
                 block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray, int]:
    """Train M = len(Cs) linear models at once by minibatch Adam; model m skips rows with fold == heldout[m].

    Returns W (M, K, D), b (M, K) and the number of epochs run.
    """
    n, d = features.shape
    dev = torch.device(device)
    rows_per_model = np.array([(fold != h).sum() for h in heldout], dtype=np.float64)
    lam = _penalty_factors(n_classes, Cs, rows_per_model)
    epochs = epochs or auto_epochs(n, batch_size)
    models = _Batched(heldout, lam, n_classes, d, loss, lr, epochs * _batches_per_epoch(n, d, batch_size, block_bytes), dev)
    y_t = torch.as_tensor(y, dtype=torch.long, device=dev)
    fold_t = torch.as_tensor(fold, dtype=torch.long, device=dev)
    rng = np.random.default_rng(seed)
    with _cpu_threads(dev, batch_size * models.w.numel()):
        for _ in range(epochs):
            for idx, x in iter_blocks(features, rng=rng, mean=mean, scale=scale, block_bytes=block_bytes):
                xt, it = torch.from_numpy(x).to(dev, non_blocking=True), torch.from_numpy(idx).to(dev)
                for s in range(0, len(idx), batch_size):
                    rows = it[s:s + batch_size]
                    models.step(xt[s:s + batch_size], y_t[rows], fold_t[rows])
    return models.w.detach().cpu().numpy(), models.b.detach().cpu().numpy(), epochs


class _Batched:
    """M linear models trained as one (M, K, D) tensor; model m ignores rows whose fold is heldout[m]."""

    def __init__(self, heldout: np.ndarray, lam: np.ndarray, n_classes: int, d: int, loss: str, lr: float,
                 total_steps: int, dev: torch.device):
        m = len(heldout)
        self.w = torch.zeros(m, n_classes, d, device=dev, requires_grad=True)
        self.b = torch.zeros(m, n_classes, device=dev, requires_grad=True)
        self.lam = torch.tensor(lam, dtype=torch.float32, device=dev)
        self.held = torch.as_tensor(heldout, dtype=torch.long, device=dev)[:, None]
        self.loss = loss
        self.opt = torch.optim.Adam([self.w, self.b], lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda t: max(0.0, 1.0 - t / max(total_steps, 1)))

    def step(self, x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor) -> None:
        """One Adam step on a batch: each model's mean loss over its rows + its L2 penalty."""
        m, k, d = self.w.shape
        scores = (x @ self.w.view(m * k, d).T).view(len(x), m, k).transpose(0, 1) + self.b[:, None, :]
        mask = (fold[None, :] != self.held).float()
        data = (_loss(scores, y, self.loss) * mask).sum(1) / mask.sum(1).clamp(min=1)
        objective = data.sum() + 0.5 * (self.lam * self.w.pow(2).sum((1, 2))).sum()
        self.opt.zero_grad(set_to_none=True)
        objective.backward()
        self.opt.step()
        self.sched.step()


@contextlib.contextmanager
def _cpu_threads(dev: torch.device, macs_per_step: int):
    """One intra-op thread for small steps: thread hand-offs cost more than they save (10x on busy cores)."""
    before = torch.get_num_threads()
    if dev.type == "cpu" and macs_per_step < 1e9:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _scores(xt: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Scores (M, n, K) of the M models [W, b] = wb (M, K, D + 1) on the codes xt (n, D)."""
    m, k, d1 = wb.shape
    return (wb[..., :-1].reshape(m * k, d1 - 1) @ xt.T).view(m, k, len(xt)).transpose(1, 2) + wb[:, None, :, -1]


def _ovr_margins(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One-vs-rest margins 1 - t s (t = +1 for the true class, -1 for the others), shape of scores (M, B, K)."""
    m, bsz, _ = scores.shape
    sign = torch.full_like(scores, -1.0).scatter(2, y.view(1, -1, 1).expand(m, bsz, 1), 1.0)
    return 1 - sign * scores


def _cs_margins(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Crammer-Singer margins 1 + s_j - s_y per wrong class j, 0 for the true class, shape of scores (M, B, K)."""
    m, bsz, _ = scores.shape
    at_y = y.view(1, -1, 1).expand(m, bsz, 1)
    return (1 + scores - scores.gather(2, at_y)).scatter(2, at_y, 0.0)


def _loss(scores: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """(M, B, K) scores, (B,) labels -> (M, B) per-row loss ("softmax", "hinge", "smooth-hinge" or "squared-hinge")."""
    m, bsz, k = scores.shape
    if loss == "softmax":
        return torch.nn.functional.cross_entropy(scores.reshape(m * bsz, k), y.repeat(m), reduction="none").view(m, bsz)
    if loss == "squared-hinge":  # LinearSVC's: one-vs-rest, sum over classes of max(0, 1 - t s)^2
        return _ovr_margins(scores, y).clamp(min=0).pow(2).sum(2)
    margins = _cs_margins(scores, y)
    if loss == "smooth-hinge":
        return SMOOTH_HINGE_TAU * torch.logsumexp(margins / SMOOTH_HINGE_TAU, dim=2)
    return margins.amax(2).clamp(min=0)  # Crammer-Singer: 1 + best wrong score - true score


def _penalty_factors(n_classes: int, Cs, rows_per_model: np.ndarray, loss: str = "softmax") -> np.ndarray:
    """lambda per model, the objective being mean loss + lambda ||W||^2 / 2."""
    # Two classes: scikit-learn penalises ||w1 - w0||^2 / 2 = ||W||^2 at the symmetric optimum. Not so for the
    # one-vs-rest squared hinge: its two rows are two mirrored copies of LinearSVC's one problem, each penalised alike.
    binary = n_classes == 2 and loss != "squared-hinge"
    return (2.0 if binary else 1.0) / (np.asarray(Cs, np.float64) * np.maximum(rows_per_model, 1))


def _stored_scale(loss: str, n_classes: int) -> float:
    """Factor from the solver's W, b to the stored rows: two-class LinearSVC (w) is stored as [-w/2, w/2]
    (see `format.as_class_rows`), and its one-vs-rest fit here holds [-w, w]."""
    return 0.5 if loss == "squared-hinge" and n_classes == 2 else 1.0


def _batches_per_epoch(n: int, d: int, batch_size: int, block_bytes: int) -> int:
    per_block = max(1, block_bytes // (4 * max(d, 1) * PIECE_ROWS)) * PIECE_ROWS
    full, rest = divmod(n, per_block)
    return full * math.ceil(per_block / batch_size) + math.ceil(rest / batch_size)


def auto_epochs(n: int, batch_size: int, target_steps: int = 1000) -> int:
    """Enough epochs for ~`target_steps` Adam steps, and at least 3 passes over the data."""
    return max(3, math.ceil(target_steps / math.ceil(max(n, 1) / batch_size)))
