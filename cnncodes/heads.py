"""Linear heads on cached CNN codes: fit with grouped cross-validation of C, report, save as HDF5.

Every head, whatever trained it, ends as the same linear form: standardise the code
(`(x - mean) / scale`), then `scores = coef @ z + intercept`, one row per class. Binary
scikit-learn models (one coefficient row `w`) are stored as the two rows `[-w/2, w/2]`, so
softmax(scores) equals their sigmoid and argmax their sign rule. That form folds into a
ResNet's `fc` (see `LinearHead.folded` and `cnncodes.predict.export_head`).

Heads (`--clf`):

- ``svm``: scikit-learn `LinearSVC` (squared hinge, one-vs-rest), codes in memory.
- ``logreg``: scikit-learn `LogisticRegression` (lbfgs, multinomial softmax), codes in memory,
  warm-started along the C grid.
- ``linear``: `TorchLinearClassifier` with the softmax loss: the same objective as ``logreg``
  solved by minibatch Adam, streaming the cache in chunks (CPU or CUDA).
- ``linear-svm``: `TorchLinearClassifier` with the multiclass (Crammer-Singer) hinge loss,
  the streaming SVM.

C means the same for all of them: the objective is ``mean loss + ||W||^2 / (2 C n)``
(scikit-learn's ``||W||^2 / 2 + C * sum loss``, divided by ``C n``).

Why minibatch Adam for the torch head (and not full-batch L-BFGS): caches larger than memory
can only be visited in chunks, one block at a time, and a stochastic method needs nothing
but the current block; L-BFGS needs exact full-data gradients every iteration, i.e. a full
read of the cache per step (tens of reads per fit). The L2 penalty sits in the loss (Adam,
not AdamW's decoupled decay) so the fit converges to the same regularised optimum that
scikit-learn finds, and C is comparable across heads; a linear learning-rate decay to zero
makes the last iterates settle. All candidate (fold, C) models are trained in the same pass
as one batched (M, classes, D) weight tensor, so cross-validation costs one read of the
data per epoch, not one per model.

Choosing C (``C="auto"``, grid 1e-5 ... 10, one value per decade) uses the train split only.
Folds are dealt per source image (the ids of `Cache.groups`, read in chunks by `image_groups`),
stratified by class (`grouped_folds`: `StratifiedGroupKFold` for one-label groups, vectorised),
so all views of an image land in one fold. Up to `HOLDOUT_ABOVE` codes: k-fold (default 5).
Above it: one stratified, grouped held-out tenth of train, scored once (k-fold would mean k
times the training work on a large cache for little gain in the estimate). A fold is scored as the
final report is: per image, on the plain view (or averaging all views with ``tta``). The
best mean accuracy wins; ties go to the smallest C (the most regularised). The standardiser
is fitted once on all train codes (label-free statistics; per-fold scalers change CV scores
negligibly and would cost an extra pass per fold). Held-out splits are read only after the
head is fitted, for the report.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .errors import CnnCodesError
from .runtime import atomic_path

CLFS = ("svm", "logreg", "linear", "linear-svm")
TORCH_CLFS = {"linear": "softmax", "linear-svm": "hinge"}
C_GRID = tuple(float(f"{c:.3g}") for c in np.logspace(-5, 1, 7))
HOLDOUT_ABOVE = 50_000  # train codes above which C is chosen on a held-out tenth, not k-fold
HOLDOUT_FOLDS = 10  # held-out fraction = 1 / HOLDOUT_FOLDS
PIECE_ROWS = 64  # rows per read; pieces are the unit of shuffling across the cache
BLOCK_BYTES = 8 << 20  # codes held in memory at once while streaming (peak ~3 blocks)
IN_MEMORY_BYTES = 512 << 20  # torch heads load a train split smaller than this
# Bytes per code value that svm/logreg hold: the float32 codes, plus per job a float32 fold copy
# (logreg) or a float64 copy and liblinear's (index, value) pairs (svm).
SKLEARN_BYTES_PER_VALUE = {"logreg": (4, 4), "svm": (4, 24)}

HEAD_FORMAT = "cnncodes-head"
HEAD_VERSION = 1
_STR = h5py.string_dtype("utf-8")
_IDENTITY_KEYS = ("arch", "weights", "weights_name", "precision")


# --------------------------------------------------------------------------- the head


@dataclass
class LinearHead:
    """A fitted head: standardiser + one linear score per class (see the module docstring)."""

    coef: np.ndarray  # (K, D) on standardised codes
    intercept: np.ndarray  # (K,)
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    classes: list[str]
    clf: str
    C: float
    meta: dict = field(default_factory=dict)  # backbone identity (arch, weights, ...), cv score, tta

    @property
    def n_features(self) -> int:
        return int(self.coef.shape[1])

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) acting on raw codes: the standardiser folded into the weights (float64)."""
        w = self.coef.astype(np.float64) / self.scale.astype(np.float64)
        b = self.intercept.astype(np.float64) - w @ self.mean.astype(np.float64)
        return w, b

    def decision_function(self, codes: np.ndarray) -> np.ndarray:
        """(N, K) class scores for raw (N, D) codes."""
        z = (np.asarray(codes, dtype=np.float64) - self.mean) / self.scale
        return z @ self.coef.T.astype(np.float64) + self.intercept

    def predict_proba(self, codes: np.ndarray) -> np.ndarray:
        """softmax of the scores: probabilities for logreg/linear, a monotone score for svm."""
        return softmax(self.decision_function(codes))

    def predict(self, codes: np.ndarray) -> np.ndarray:
        """Index into `classes` of the best score per row."""
        return self.decision_function(codes).argmax(axis=1)

    def save(self, path: str | Path) -> None:
        """Write the head as HDF5 (numeric and string datasets, attributes; no pickle), atomically."""
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = HEAD_FORMAT
            f.attrs["format_version"] = HEAD_VERSION
            f.attrs["clf"] = self.clf
            f.attrs["C"] = float(self.C)
            f.attrs["feature_dim"] = self.n_features
            f.attrs["meta"] = json.dumps(self.meta, sort_keys=True)
            for key in _IDENTITY_KEYS:
                f.attrs[key] = str(self.meta.get(key, ""))
            f.attrs["preprocessing"] = json.dumps(self.meta.get("preprocessing", {}))
            f.create_dataset("coef", data=self.coef.astype(np.float32))
            f.create_dataset("intercept", data=self.intercept.astype(np.float32))
            f.create_dataset("mean", data=self.mean.astype(np.float32))
            f.create_dataset("scale", data=self.scale.astype(np.float32))
            f.create_dataset("classes", data=np.array(self.classes, dtype=object), dtype=_STR)

    @classmethod
    def load(cls, path: str | Path) -> LinearHead:
        """Read and validate a head file; anything else is a one-line CnnCodesError."""
        path = Path(path)
        if not path.is_file():
            raise CnnCodesError(f"{path}: no such head file; create one with `cnncodes fit-head CACHE -o {path}`")
        try:
            with h5py.File(path, "r") as f:
                return _read_head(f, path)
        except OSError as e:
            raise CnnCodesError(f"{path}: not a readable HDF5 head file ({str(e).splitlines()[0]}); "
                                f"re-create it with `cnncodes fit-head`") from e


def _read_head(f: h5py.File, path: Path) -> LinearHead:
    if f.attrs.get("format") != HEAD_FORMAT:
        what = "a cnncodes cache, not a head" if f.attrs.get("format") == "cnncodes-cache" else "not a cnncodes head"
        raise CnnCodesError(f"{path}: HDF5 file but {what} (no format={HEAD_FORMAT} attribute); "
                            f"create a head with `cnncodes fit-head CACHE -o HEAD.h5`")
    if int(f.attrs.get("format_version", -1)) != HEAD_VERSION:
        raise CnnCodesError(f"{path}: head format version {f.attrs.get('format_version')} is not supported "
                            f"(this cnncodes reads {HEAD_VERSION}); re-fit it")

    def bad(why: str) -> CnnCodesError:
        return CnnCodesError(f"{path}: damaged head file ({why}); re-create it with `cnncodes fit-head`")

    arrays = {}
    for name in ("coef", "intercept", "mean", "scale"):
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset) or ds.dtype.kind != "f":
            raise bad(f"'{name}' is missing or not a float dataset")
        arrays[name] = ds[()].astype(np.float64)
    ds = f.get("classes")
    if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "OS":
        raise bad("'classes' is missing or not a string dataset")
    classes = [str(c) for c in ds.asstr()[()]]
    k, d = len(classes), arrays["mean"].shape[0] if arrays["mean"].ndim == 1 else -1
    expected = {"coef": (k, d), "intercept": (k,), "mean": (d,), "scale": (d,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise bad(f"'{name}' has shape {arrays[name].shape}, expected {shape} for {k} classes, dim {d}")
    if k < 2 or not all(np.isfinite(a).all() for a in arrays.values()) or (arrays["scale"] <= 0).any():
        raise bad("fewer than 2 classes, non-finite values or a non-positive scale")
    try:
        meta = json.loads(f.attrs["meta"])
        clf, C = str(f.attrs["clf"]), float(f.attrs["C"])
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"attributes: {e}") from e
    return LinearHead(arrays["coef"], arrays["intercept"], arrays["mean"], arrays["scale"], classes, clf, C, meta)


def softmax(scores: np.ndarray) -> np.ndarray:
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def as_class_rows(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's binary (1, D) form -> the two-row form [-w/2, w/2]; (K, D) unchanged."""
    coef, intercept = np.atleast_2d(coef), np.atleast_1d(intercept)
    if coef.shape[0] == 1:
        return np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef, intercept


# --------------------------------------------------------------------------- reading codes in chunks


def iter_blocks(features, rng: np.random.Generator | None = None, mean: np.ndarray | None = None,
                scale: np.ndarray | None = None, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices, float32 codes) blocks of an (N, D) h5 dataset or array; memory ~ two blocks.

    With `rng`: pieces of PIECE_ROWS rows in shuffled order, rows shuffled within each block
    (caches are sorted by class, so a block mixes pieces from all over the file); without, the
    rows in order. `mean`/`scale`: standardise on the fly. Blocks are views of one buffer:
    use each before asking for the next.
    """
    n, d = features.shape
    starts = np.arange(0, n, PIECE_ROWS)
    if rng is not None:
        starts = rng.permutation(starts)
    per_block = max(1, block_bytes // (4 * max(d, 1) * PIECE_ROWS))
    buf = np.empty((min(per_block * PIECE_ROWS, n), d), np.float32)
    mean32 = None if mean is None else mean.astype(np.float32)
    scale32 = None if scale is None else scale.astype(np.float32)
    for i in range(0, len(starts), per_block):
        group = starts[i:i + per_block]
        idx = np.concatenate([np.arange(s, min(s + PIECE_ROWS, n)) for s in group])
        at = 0
        for s in group:
            e = min(s + PIECE_ROWS, n)
            _read_rows(features, s, e, buf[at:at + e - s])
            at += e - s
        x = buf[:at]
        if rng is not None:
            p = rng.permutation(len(idx))
            idx, x = idx[p], x[p]
        if mean32 is not None:
            x -= mean32
            x /= scale32
        yield idx, x


def _read_rows(features, start: int, stop: int, out: np.ndarray) -> None:
    if isinstance(features, h5py.Dataset) and features.dtype == np.float32:
        features.read_direct(out, np.s_[start:stop])
    else:
        out[...] = features[start:stop]


def code_stats(features, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and scale (std, 1 where constant) in one streaming pass.

    Raises CnnCodesError naming the split and the count of codes holding NaN/inf.
    """
    n, d = features.shape
    count, mean, m2, bad = 0, np.zeros(d), np.zeros(d), 0
    for _, x in iter_blocks(features):
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            bad += int((~finite).sum())
            x = x[finite]
        if not len(x):
            continue
        # Chan et al.'s pairwise update (stable for millions of rows); float64 sums, float32 temporaries.
        bm, bn = x.mean(axis=0, dtype=np.float64), len(x)
        x -= bm.astype(np.float32)
        np.square(x, out=x)
        delta = bm - mean
        mean = mean + delta * bn / (count + bn)
        m2 = m2 + x.sum(axis=0, dtype=np.float64) + delta ** 2 * count * bn / (count + bn)
        count += bn
    if bad:
        raise nonfinite_error(split, bad, n)
    std = np.sqrt(m2 / max(count, 1))
    scale = np.where(std > 1e-12 * max(1.0, float(np.abs(mean).max(initial=0))), std, 1.0)
    return mean, scale


def nonfinite_error(split: str, bad: int, n: int) -> CnnCodesError:
    return CnnCodesError(f"{split}: {bad} of {n} codes hold NaN/inf values; the cache is damaged or the backbone "
                         f"diverged: re-extract with `cnncodes extract --overwrite` (try --precision fp32)")


# --------------------------------------------------------------------------- the torch head


def _train_torch(features, y: np.ndarray, n_classes: int, fold: np.ndarray, heldout: np.ndarray, Cs: np.ndarray,
                 loss: str, *, mean=None, scale=None, epochs: int | None = None, batch_size: int = 256,
                 lr: float = 0.01, device: str | torch.device = "cpu", seed: int = 0,
                 block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray, int]:
    """Train M = len(Cs) linear models at once by minibatch Adam; model m skips rows with fold == heldout[m].

    Returns W (M, K, D), b (M, K) and the number of epochs run.
    """
    n, d = features.shape
    dev = torch.device(device)
    rows_per_model = np.array([(fold != h).sum() for h in heldout], dtype=np.float64)
    # Two classes: scikit-learn penalises ||w1 - w0||^2 / 2 = ||W||^2 at the symmetric optimum.
    lam = (2.0 if n_classes == 2 else 1.0) / (np.asarray(Cs, np.float64) * np.maximum(rows_per_model, 1))
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


def _loss(scores: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """(M, B, K) scores, (B,) labels -> (M, B) per-row loss."""
    m, bsz, k = scores.shape
    if loss == "softmax":
        return torch.nn.functional.cross_entropy(scores.reshape(m * bsz, k), y.repeat(m), reduction="none").view(m, bsz)
    true = scores.gather(2, y.view(1, -1, 1).expand(m, bsz, 1))
    margins = (1 + scores - true).scatter(2, y.view(1, -1, 1).expand(m, bsz, 1), 0.0)
    return margins.amax(2).clamp(min=0)  # Crammer-Singer: 1 + best wrong score - true score


def _batches_per_epoch(n: int, d: int, batch_size: int, block_bytes: int) -> int:
    per_block = max(1, block_bytes // (4 * max(d, 1) * PIECE_ROWS)) * PIECE_ROWS
    full, rest = divmod(n, per_block)
    return full * math.ceil(per_block / batch_size) + math.ceil(rest / batch_size)


def auto_epochs(n: int, batch_size: int, target_steps: int = 1000) -> int:
    """Enough epochs for ~`target_steps` Adam steps, and at least 3 passes over the data."""
    return max(3, math.ceil(target_steps / math.ceil(max(n, 1) / batch_size)))


class TorchLinearClassifier(ClassifierMixin, BaseEstimator):
    """Linear classifier trained with minibatch Adam in torch (CPU or CUDA), scikit-learn style.

    Minimises ``mean loss + ||coef||^2 / (2 C n)``: with ``loss="softmax"`` this is
    `LogisticRegression(C=C)`'s optimum (multinomial), with ``loss="hinge"`` a multiclass
    (Crammer-Singer) linear SVM. Features are used as given: put a `StandardScaler` before it
    in a `Pipeline` (the `cnncodes fit-head` path standardises for you, streaming).

    Parameters: C (inverse regularisation), loss ("softmax" or "hinge"), max_iter (epochs;
    None: ~1000 steps, >= 3 epochs), batch_size, lr (Adam, decayed linearly to 0),
    device ("cpu", "cuda", ...), random_state (shuffling; zero init, so fits are reproducible).
    """

    def __init__(self, C: float = 1.0, loss: str = "softmax", max_iter: int | None = None, batch_size: int = 256,
                 lr: float = 0.01, device: str = "cpu", random_state: int = 0):
        self.C = C
        self.loss = loss
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.lr = lr
        self.device = device
        self.random_state = random_state

    def fit(self, X, y) -> TorchLinearClassifier:
        """Fit on (n_samples, n_features) X and class labels y."""
        if self.loss not in ("softmax", "hinge"):
            raise ValueError(f"loss must be 'softmax' or 'hinge', got {self.loss!r}")
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise ValueError(f"C must be a positive number, got {self.C!r}")
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], order="C")
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes in the data, "
                             f"but the data contains only one class: {self.classes_[0]!r}")
        x32 = np.ascontiguousarray(X, dtype=np.float32)
        fold = np.zeros(len(y_idx), np.int64)
        w, b, self.n_iter_ = _train_torch(x32, y_idx, len(self.classes_), fold, np.array([-1]), np.array([float(self.C)]),
                                          self.loss, epochs=self.max_iter, batch_size=self.batch_size, lr=self.lr,
                                          device=self.device, seed=self.random_state)
        self._W, self._b = w[0].astype(np.float64), b[0].astype(np.float64)
        binary = len(self.classes_) == 2
        self.coef_ = (self._W[1:] - self._W[:1]) if binary else self._W
        self.intercept_ = (self._b[1:] - self._b[:1]) if binary else self._b
        return self

    def decision_function(self, X) -> np.ndarray:
        """Class scores (n, K); for two classes the score of classes_[1] minus classes_[0], shape (n,)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        idx = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)
        return self.classes_[idx]

    def _has_proba(self) -> bool:
        return self.loss == "softmax"

    @available_if(_has_proba)
    def predict_proba(self, X) -> np.ndarray:
        """Softmax probabilities (loss="softmax" only, like SGDClassifier)."""
        scores = self.decision_function(X)
        scores = np.column_stack([-scores / 2, scores / 2]) if scores.ndim == 1 else scores
        return softmax(scores)

    @available_if(_has_proba)
    def predict_log_proba(self, X) -> np.ndarray:
        return np.log(self.predict_proba(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags


# --------------------------------------------------------------------------- training data


@dataclass
class TrainSet:
    """The train split as the solvers see it: codes (h5 dataset, or standardised array) and row tags."""

    features: object  # h5py.Dataset (streamed, standardised per block) or np.ndarray (already standardised)
    y: np.ndarray  # index into `classes` (the classes present in train)
    groups: np.ndarray  # source image per row
    views: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    classes: np.ndarray  # cache class indices present in train, sorted

    @property
    def in_memory(self) -> bool:
        return isinstance(self.features, np.ndarray)

    @property
    def std_args(self) -> dict:
        """mean/scale for `iter_blocks`: none when the array is already standardised."""
        return {} if self.in_memory else {"mean": self.mean, "scale": self.scale}


def load_train(cache, in_memory: bool | None = None) -> TrainSet:
    """Validate the train split, compute the standardiser (streaming) and load it if it fits.

    in_memory: True/False forces; None loads when smaller than IN_MEMORY_BYTES.
    """
    if "train" not in cache.splits:
        have = ", ".join(cache.splits) or "none"
        raise CnnCodesError(f"{cache.path}: no 'train' split (splits: {have}); a head is fitted on train: "
                            f"extract DATA/train/<class>/<image> (or DATA/<class>/<image>)")
    feats = cache.features("train")
    labels = cache.labels("train")
    if len(labels) == 0:
        raise CnnCodesError(f"{cache.path}: the train split has no codes (all images skipped?); see `cnncodes info {cache.path}`")
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise CnnCodesError(f"{cache.path}: the train split has only one class ('{cache.classes[classes[0]]}'); "
                            f"a classifier needs training images of at least 2 classes")
    groups = image_groups(cache, "train")
    mean, scale = code_stats(feats, "train")
    nbytes = feats.shape[0] * feats.shape[1] * 4
    if in_memory or (in_memory is None and nbytes <= IN_MEMORY_BYTES):
        x = np.empty(feats.shape, np.float32)
        for lo in range(0, len(x), 65536):
            _read_rows(feats, lo, min(lo + 65536, len(x)), x[lo:lo + 65536])
        x -= mean.astype(np.float32)
        x /= scale.astype(np.float32)
        feats = x
    return TrainSet(feats, y.astype(np.int64), groups, cache.views("train"), mean, scale, classes)


def image_groups(cache, split: str, chunk: int = 16384) -> np.ndarray:
    """One id per source image, like `Cache.groups`, reading the paths in chunks (memory ~ chunk).

    Relies on the cache layout (an image's rows are contiguous, its plain view first) and
    checks it: a new path must start exactly where views == 0.
    """
    paths = cache.require_split(split)["paths"]
    views = cache.views(split)
    ids = np.empty(len(views), np.int64)
    last, current = None, -1
    for lo in range(0, len(views), chunk):
        p = np.asarray(paths.asstr()[lo:lo + chunk], dtype=object)
        new = np.r_[p[0] != last, p[1:] != p[:-1]].astype(bool)
        if not np.array_equal(new, views[lo:lo + chunk] == 0):
            raise CnnCodesError(f"{cache.path}: {split} rows are not grouped by image (plain view first); the cache is "
                                f"damaged: re-extract with `cnncodes extract --overwrite`")
        ids[lo:lo + chunk] = current + np.cumsum(new)
        current, last = ids[min(lo + chunk, len(ids)) - 1], p[-1]
    return ids


def cv_folds(data: TrainSet, folds: int, seed: int) -> tuple[np.ndarray, int, str]:
    """Fold id per row (all views of an image share it), the number of scored folds, a description.

    k-fold up to HOLDOUT_ABOVE codes, else one held-out tenth (fold 0 held out, fold 1 trains).
    """
    n_images = len(np.unique(data.groups))
    holdout = len(data.y) > HOLDOUT_ABOVE
    k = HOLDOUT_FOLDS if holdout else min(folds, n_images)
    if k < 2:
        raise CnnCodesError(f"only {n_images} training image(s): too few to cross-validate C; pass a fixed --C (e.g. --C 0.01)")
    fold = grouped_folds(data.y, data.groups, k, seed)
    if holdout:
        return np.where(fold == 0, 0, 1), 1, f"held-out 1/{HOLDOUT_FOLDS} of train images (more than {HOLDOUT_ABOVE} codes)"
    return fold, k, f"{k}-fold over train images (views of one image in one fold)"


def grouped_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Stratified, grouped k-fold ids per row: images are dealt to folds class by class, in random order.

    What `StratifiedGroupKFold(shuffle=True)` does when each group (image) has one label,
    vectorised: per class, fold sizes differ by at most one image (sklearn's greedy search is
    O(images x folds) in Python, ~15 s for 40k images).
    """
    ids, first = np.unique(groups, return_index=True)
    img_label = y[first]
    rng = np.random.default_rng(seed)
    fold_img = np.empty(len(ids), np.int64)
    offset = 0
    for c in np.unique(img_label):
        members = rng.permutation(np.flatnonzero(img_label == c))
        fold_img[members] = (offset + np.arange(len(members))) % k  # continue where the last class stopped
        offset += len(members)
    return fold_img[np.searchsorted(ids, groups)]


# --------------------------------------------------------------------------- scoring per image


def predict_images(features, groups: np.ndarray, views: np.ndarray, key: np.ndarray, models: dict,
                   tta: bool, split: str = "train", mean=None, scale=None,
                   block_bytes: int = BLOCK_BYTES) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Predicted class per image, streaming the rows in order.

    key: per row, which entry of `models` ({key: (W (G, K, D), b (G, K))}) scores it; rows with
    a key not in `models` are skipped. Scores are averaged over an image's views with `tta`,
    else only its plain view (views == 0) is used. Returns {key: (first row of each image,
    predicted class per image and model (n, G))}. Raises on NaN/inf codes among the rows used.
    """
    n, d = features.shape
    used = np.isin(key, list(models)) & (True if tta else views == 0)
    is_start = np.r_[True, groups[1:] != groups[:-1]] if n else np.zeros(0, bool)
    image_start, image_id = np.flatnonzero(is_start), np.cumsum(is_start) - 1
    block_rows = max(1, block_bytes // (4 * max(d, 1)))
    out: dict[int, list] = {k: [] for k in models}
    bad, a = 0, 0
    while a < n:
        nxt = np.searchsorted(image_start, a + block_rows)
        b = int(image_start[nxt]) if nxt < len(image_start) else n
        b = b if b > a else n  # one image larger than a block: take it whole
        r = used[a:b]
        if r.any():
            x = np.empty((b - a, d), np.float32)
            _read_rows(features, a, b, x)
            if not r.all():
                x = x[r]
            ids, keys = image_id[a:b][r], key[a:b][r]
            bad += int((~np.isfinite(x).all(axis=1)).sum())
            if mean is not None:
                x -= mean.astype(np.float32)
                x /= scale.astype(np.float32)
            for k in np.unique(keys):
                sel = keys == k
                w, bias = models[int(k)]
                g, kk = bias.shape
                s = x[sel] @ w.reshape(g * kk, d).T.astype(np.float32) + bias.reshape(-1).astype(np.float32)
                first = np.flatnonzero(np.r_[True, ids[sel][1:] != ids[sel][:-1]])
                summed = np.add.reduceat(s, first, axis=0)
                rows = np.flatnonzero(r)[sel][first] + a
                out[int(k)].append((rows, summed.reshape(-1, g, kk).argmax(axis=2)))
        a = b
    if bad:
        raise nonfinite_error(split, bad, int(used.sum()))
    return {k: (np.concatenate([r for r, _ in v]) if v else np.zeros(0, np.int64),
                np.concatenate([p for _, p in v]) if v else np.zeros((0, models[k][1].shape[0]), np.int64))
            for k, v in out.items()}


# --------------------------------------------------------------------------- solvers


def _sklearn_estimator(clf: str, seed: int, shape: tuple[int, int]):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if clf == "svm":
        # Dual coordinate descent while n is within a few D (3x faster than the primal solver that
        # dual="auto" picks for n > D on 2k x 2k codes); primal (TRON) for n >> D, where dual crawls.
        return LinearSVC(C=1.0, dual=bool(shape[0] <= 4 * shape[1]), max_iter=5000, random_state=seed)
    return LogisticRegression(C=1.0, max_iter=1000, warm_start=True)


def _one_blas_thread():
    """BLAS on one thread: the solvers' matrix-vector products lose more to thread hand-offs than
    they gain (a 7-C logreg path on 2k x 2k codes: 3.7 s with 2 threads, 0.12 s with 1; 90k x 512:
    38 s vs 5.7 s on a busy 2-core machine). Parallelism comes from running jobs in threads."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


@contextlib.contextmanager
def _quiet_convergence() -> Iterator[None]:
    """Silence sklearn's ConvergenceWarning (it becomes a note). Entered by the calling thread
    only: catch_warnings swaps process-wide state and is not safe to nest across threads."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _sklearn_path(clf: str, x: np.ndarray, y: np.ndarray, n_classes: int, Cs: Sequence[float], seed: int,
                  notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """W (G, K, D), b (G, K) for each C (ascending: logreg warm-starts from the previous C)."""
    w = np.zeros((len(Cs), n_classes, x.shape[1]))
    b = np.full((len(Cs), n_classes), -1e30)  # a class absent from a fold is never predicted
    present = np.unique(y)
    if len(present) < 2:
        b[:, present] = 0.0
        return w, b
    est = _sklearn_estimator(clf, seed, x.shape)
    for i, C in enumerate(Cs):
        est.set_params(C=float(C)).fit(x, y)
        # Read from the estimator, not from a warnings.catch_warnings: this runs in pool threads
        # and warning filters are process-wide (the caller silences the printed warning).
        if np.max(est.n_iter_) >= est.max_iter:
            notes.append(f"{clf} did not fully converge at C={C:g}")
        coef, icpt = as_class_rows(est.coef_, est.intercept_)
        w[i][est.classes_] = coef
        b[i][est.classes_] = icpt
    return w, b


@dataclass
class Selection:
    """Outcome of choosing C: the chosen value, the grid and mean CV accuracy per C."""

    C: float
    auto: bool
    grid: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # mean per-image CV accuracy per grid value
    score: float | None = None
    strategy: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"C": self.C, "auto": self.auto, "grid": self.grid, "cv_scores": self.scores,
                "cv_score": self.score, "strategy": self.strategy, "notes": sorted(set(self.notes))}


def _pick(grid: Sequence[float], fold_scores: np.ndarray) -> tuple[int, np.ndarray]:
    """Best mean accuracy; ties go to the smallest C (grid ascending)."""
    mean = fold_scores.mean(axis=0)
    return int(np.flatnonzero(mean >= mean.max() - 1e-12)[0]), mean


def fit_linear(data: TrainSet, clf: str, C: float | None, *, grid: Sequence[float] = C_GRID, folds: int = 5,
               tta: bool = False, device: str | torch.device = "cpu", max_iter: int | None = None,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, Selection]:
    """Fit `clf` on `data`; C=None chooses C by grouped CV. Returns W (K, D), b (K,) and the selection."""
    grid = sorted(float(c) for c in grid)
    K = len(data.classes)
    if C is None:
        fold, n_folds, strategy = cv_folds(data, folds, seed)
    else:
        fold, n_folds, strategy, grid = np.zeros(len(data.y), np.int64), 0, "fixed C", [float(C)]
    sel = Selection(C=float(C) if C is not None else float("nan"), auto=C is None, grid=list(grid), strategy=strategy)
    if clf in TORCH_CLFS:
        heldout = np.repeat(np.r_[np.arange(n_folds), -1], len(grid))  # fold models, then full-data models
        Cs = np.tile(grid, n_folds + 1)
        w_all, b_all, _ = _train_torch(data.features, data.y, K, fold, heldout, Cs, TORCH_CLFS[clf],
                                       epochs=max_iter, device=device, seed=seed, **data.std_args)
        fold_models = {f: (w_all[f * len(grid):(f + 1) * len(grid)], b_all[f * len(grid):(f + 1) * len(grid)])
                       for f in range(n_folds)}
    else:
        fold_models = _sklearn_folds(clf, data, fold, n_folds, grid, seed, sel.notes)
    if n_folds:
        scores = _fold_scores(data, fold, fold_models, tta)
        best, mean = _pick(grid, scores)
        sel.C, sel.scores, sel.score = grid[best], [float(s) for s in mean], float(mean[best])
    best = grid.index(sel.C)
    if clf in TORCH_CLFS:
        w, b = w_all[n_folds * len(grid) + best], b_all[n_folds * len(grid) + best]
    else:
        x = np.ascontiguousarray(data.features, dtype=np.float64 if clf == "svm" else np.float32)
        with _one_blas_thread(), _quiet_convergence():
            w, b = _sklearn_path(clf, x, data.y, K, [sel.C], seed, sel.notes)
        w, b = w[0], b[0]
    return w.astype(np.float64), b.astype(np.float64), sel


def _sklearn_folds(clf: str, data: TrainSet, fold: np.ndarray, n_folds: int, grid: Sequence[float], seed: int,
                   notes: list[str]) -> dict:
    """{fold: (W (G, K, D), b (G, K))}, jobs in parallel threads (liblinear and lbfgs release the GIL).

    logreg: one warm-started C path per fold; svm (no warm start in liblinear): one job per (fold, C).
    """
    from concurrent.futures import ThreadPoolExecutor

    from .data import available_cores

    dtype = np.float64 if clf == "svm" else np.float32  # liblinear copies anything else to float64, per fit

    def run(f: int, cs: list[float]):  # the fold copy is made inside the job: at most `workers` exist at once
        keep = fold != f
        return _sklearn_path(clf, np.ascontiguousarray(data.features[keep], dtype=dtype), data.y[keep], K, cs, seed, notes)

    jobs = []
    for f in range(n_folds):
        jobs += [(f, [c]) for c in grid] if clf == "svm" else [(f, list(grid))]
    K = len(data.classes)
    room = max(1, available_memory() // max(SKLEARN_BYTES_PER_VALUE[clf][1] * data.features.size, 1))
    with _one_blas_thread(), _quiet_convergence(), ThreadPoolExecutor(max(1, min(len(jobs), available_cores(), room))) as pool:
        done = [(f, pool.submit(run, f, cs)) for f, cs in jobs]
        results = [(f, job.result()) for f, job in done]
    return {f: (np.concatenate([w for g, (w, _) in results if g == f]), np.concatenate([b for g, (_, b) in results if g == f]))
            for f in range(n_folds)}


def _fold_scores(data: TrainSet, fold: np.ndarray, fold_models: dict, tta: bool) -> np.ndarray:
    """(n_folds, G) per-image accuracy of each fold's models on that fold's held-out images."""
    preds = predict_images(data.features, data.groups, data.views, fold, fold_models, tta, **data.std_args)
    return np.stack([(p == data.y[rows][:, None]).mean(axis=0) for rows, p in (preds[f] for f in sorted(fold_models))])


# --------------------------------------------------------------------------- fit-head


def parse_C(value) -> float | None:
    """'auto' -> None (cross-validate); a positive number -> float; else CnnCodesError."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        c = float(value)
    except (TypeError, ValueError):
        raise CnnCodesError(f"--C must be 'auto' or a positive number, got {value!r}") from None
    if not (c > 0 and math.isfinite(c)):
        raise CnnCodesError(f"--C must be 'auto' or a positive number, got {value!r}")
    return c


def fit_head(cache_path: str | Path, clf: str = "logreg", C: float | str | None = "auto", *, tta: bool = False,
             folds: int = 5, grid: Sequence[float] = C_GRID, device: str = "auto", max_iter: int | None = None,
             allow_unseen_classes: bool = False, seed: int = 0,
             log: Callable[[str], None] | None = None) -> tuple[LinearHead, dict]:
    """Fit a linear head on a cache's train split and report on every other split.

    clf: svm | logreg | linear | linear-svm (see the module docstring). C: "auto" (grouped CV
    on train only) or a number. tta: score held-out images by averaging all their stored
    views. Returns the head and a JSON-friendly report. Held-out splits are read only after
    the head is fitted (their labels are checked first for classes the head cannot learn).
    """
    from .runtime import resolve_device

    log = log or (lambda m: None)
    if clf not in CLFS:
        raise CnnCodesError(f"unknown --clf '{clf}'; choose one of: {', '.join(CLFS)}")
    fixed_C = parse_C(C)
    dev = resolve_device(device)
    if folds < 2:
        raise CnnCodesError(f"--folds must be >= 2, got {folds}")
    from .store import Cache

    start = time.perf_counter()
    with Cache(cache_path) as cache:
        if clf not in TORCH_CLFS and "train" in cache.splits:
            _check_memory(clf, cache.features("train").size, cache.path, log)
        data = load_train(cache, in_memory=True if clf not in TORCH_CLFS else None)
        heldout = [s for s in cache.splits if s != "train"]
        unseen = {s: _unseen(cache, s, data.classes, allow_unseen_classes) for s in heldout}
        w, b, sel = fit_linear(data, clf, fixed_C, grid=grid, folds=folds, tta=tta, device=dev, max_iter=max_iter, seed=seed)
        fit_seconds = time.perf_counter() - start
        head = LinearHead(w, b, data.mean, data.scale, [cache.classes[i] for i in data.classes], clf, sel.C,
                          _head_meta(cache, sel, tta))
        log(f"fitted {clf} in {fit_seconds:.1f} s: C={sel.C:g}" + (f" (CV accuracy {sel.score:.4f}, {sel.strategy})" if sel.auto else ""))
        report = {
            "cache": str(cache.path), "clf": clf, "C": sel.C, "selection": sel.to_dict(), "tta": tta,
            "fit_seconds": round(fit_seconds, 3), "device": str(dev),
            "train": {"images": len(np.unique(data.groups)), "codes": len(data.y)},
            "splits": {s: evaluate_split(head, cache, s, tta, unseen[s]) for s in heldout},
        }
    if not heldout:
        report["note"] = "no held-out split in the cache (only train): the CV accuracy is the only estimate"
    return head, report


def _check_memory(clf: str, values: int, path, log: Callable[[str], None]) -> None:
    """Refuse an in-memory head that cannot fit in RAM; point to the streaming heads."""
    fixed, per_job = SKLEARN_BYTES_PER_VALUE[clf]
    need, free = values * (fixed + per_job), available_memory()
    hint = f"--clf {'linear-svm' if clf == 'svm' else 'linear'} streams the codes from the cache in bounded memory"
    if need > free:
        raise CnnCodesError(f"{path}: --clf {clf} needs about {need / 2**30:.1f} GiB for {values / 1e6:.0f}M code values, "
                            f"{free / 2**30:.1f} GiB are available: {hint}")
    if values > 50_000_000:
        log(f"note: --clf {clf} holds about {need / 2**30:.1f} GiB and solves on one core per fold/C; {hint} (faster at this size)")


def available_memory() -> int:
    """MemAvailable (Linux), else free physical memory, else 8 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _unseen(cache, split: str, train_classes: np.ndarray, allow: bool) -> dict[str, int]:
    """Images per class of `split` that has no training codes; refused unless `allow`."""
    labels = cache.labels(split)
    missing = np.setdiff1d(np.unique(labels), train_classes)
    if not len(missing):
        return {}
    views = cache.views(split)
    counts = {cache.classes[c]: int(((labels == c) & (views == 0)).sum()) for c in missing}
    if counts and not allow:
        names = ", ".join(f"'{c}' ({n} images)" for c, n in counts.items())
        raise CnnCodesError(f"{split} has class(es) {names} with no training codes, so a head cannot predict them; "
                            f"add training images of them, remove them from {split}, or pass --allow-unseen-classes "
                            f"to report with them counted as errors")
    return counts


def _head_meta(cache, sel: Selection, tta: bool) -> dict:
    from . import __version__

    cfg = cache.config
    return {"arch": cfg.arch, "weights": cfg.weights, "weights_name": cfg.weights_name, "precision": cfg.precision,
            "preprocessing": cfg.preprocessing, "feature_dim": cache.feature_dim, "cache": str(cache.path),
            "layers": getattr(cfg, "layers", ""),
            "cv": sel.to_dict(), "tta": tta, "cnncodes_version": __version__}


def evaluate_split(head: LinearHead, cache, split: str, tta: bool, unseen: dict[str, int] | None = None) -> dict:
    """Per-image accuracy, per-class precision/recall and the confusion matrix of `head` on a split."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    feats, labels, views, groups = cache.features(split), cache.labels(split), cache.views(split), image_groups(cache, split)
    if head.n_features != feats.shape[1]:
        raise CnnCodesError(f"{cache.path}: {feats.shape[1]}-d codes but the head expects {head.n_features}-d")
    lookup = {c: i for i, c in enumerate(cache.classes)}
    to_cache = np.array([lookup[c] for c in head.classes])
    preds = predict_images(feats, groups, views, np.zeros(len(labels), np.int64),
                           {0: (head.coef[None], head.intercept[None])}, tta, split, head.mean, head.scale)
    rows, pred = preds[0]
    if not len(rows):
        return {"images": 0, "views_per_image": 0, "accuracy": None, "correct": 0, "per_class": {},
                "confusion": {"labels": [], "matrix": []}, "unseen_classes": unseen or {}}
    y_true, y_pred = labels[rows], to_cache[pred[:, 0]]
    names = sorted(set(y_true.tolist()) | set(to_cache.tolist()))
    p, r, _, support = precision_recall_fscore_support(y_true, y_pred, labels=names, zero_division=0)
    used = len(labels) if tta else len(rows)
    return {
        "images": len(rows),
        "views_per_image": round(used / max(len(rows), 1), 3),  # > 1 only with tta and stored eval views
        "accuracy": float((y_true == y_pred).mean()),
        "correct": int((y_true == y_pred).sum()),
        "per_class": {cache.classes[c]: {"precision": float(pi), "recall": float(ri), "support": int(si)}
                      for c, pi, ri, si in zip(names, p, r, support)},
        "confusion": {"labels": [cache.classes[c] for c in names],
                      "matrix": confusion_matrix(y_true, y_pred, labels=names).tolist()},
        "unseen_classes": unseen or {},
    }


# --------------------------------------------------------------------------- synthetic caches (tests, benchmarks)


def write_synthetic_cache(path: str | Path, images: dict[str, int], dim: int = 512, n_classes: int = 10,
                          views: int = 0, eval_views: int = 0, separation: float = 3.0, seed: int = 0) -> Path:
    """Write a cache in the `store` format with Gaussian class clusters, without holding it in memory.

    images: {split: number of source images}; train images get 1 + `views` rows, others
    1 + `eval_views`. Rows are sorted by class then image then view, like a real cache.
    `separation` is the distance between class means in units of the per-image noise.
    """
    from . import __version__
    from .data import Preprocessing
    from .store import FORMAT, FORMAT_VERSION, ROW_CHUNK, STR, CacheConfig

    path = Path(path)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * separation / np.sqrt(2 * dim)  # |c_i - c_j| ~ separation
    classes = [f"class{k:03d}" for k in range(n_classes)]
    config = CacheConfig("resnet18", "none:seed0", "none", "fp32", Preprocessing().to_dict(), views, eval_views, seed)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_json(),
                        "preprocessing": json.dumps(config.preprocessing), "classes": json.dumps(classes),
                        "feature_dim": dim, "cnncodes_version": __version__, "torch_version": str(torch.__version__),
                        "torchvision_version": "synthetic"})
        for key in ("arch", "weights", "weights_name", "precision", "views", "eval_views", "seed"):
            f.attrs[key] = getattr(config, key)
        for s_i, (split, n_img) in enumerate(images.items()):
            per = 1 + (views if split == "train" else eval_views)
            _synthetic_split(f.create_group(split), n_img, per, centers, classes, ROW_CHUNK, STR, seed + 7919 * (s_i + 1))
    return path


def _synthetic_split(g: h5py.Group, n_img: int, per: int, centers: np.ndarray, classes: list[str],
                     chunk: int, str_dtype, seed: int) -> None:
    n, dim = n_img * per, centers.shape[1]
    label_of_image = (np.arange(n_img) * len(classes)) // max(n_img, 1)  # sorted by class, like a folder
    feats = g.create_dataset("features", shape=(n, dim), dtype=np.float32, maxshape=(None, dim) if n else None,
                             chunks=(min(chunk, n), dim) if n else None)
    step = max(1, (8 << 20) // (4 * dim * per))  # images per write: ~8 MB
    for lo in range(0, n_img, step):
        hi = min(lo + step, n_img)
        rng = np.random.default_rng([seed, lo])
        base = centers[label_of_image[lo:hi]] + rng.normal(size=(hi - lo, dim))
        rows = np.repeat(base, per, axis=0) + 0.3 * rng.normal(size=((hi - lo) * per, dim))
        feats[lo * per:hi * per] = np.maximum(rows + 1.0, 0).astype(np.float32)  # ReLU codes are >= 0
    image_paths = np.array([f"{classes[c]}/{i:07d}.jpg" for i, c in enumerate(label_of_image)], dtype=object)
    g.create_dataset("labels", data=np.repeat(label_of_image, per).astype(np.int64))
    g.create_dataset("paths", data=np.repeat(image_paths, per), dtype=str_dtype)
    g.create_dataset("views", data=np.tile(np.arange(per), n_img).astype(np.int16))
    files, skipped = g.create_group("files"), g.create_group("skipped")
    files.create_dataset("paths", data=image_paths, dtype=str_dtype)
    files.create_dataset("size", data=np.zeros(n_img, np.int64))
    files.create_dataset("mtime_ns", data=np.zeros(n_img, np.int64))
    skipped.create_dataset("paths", data=np.array([], dtype=object), dtype=str_dtype)
    skipped.create_dataset("reasons", data=np.array([], dtype=object), dtype=str_dtype)
