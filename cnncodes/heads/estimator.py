"""`TorchLinearClassifier`: the heads' minibatch Adam solver (`torch_solver.train_torch`) as a scikit-learn
estimator. Apart from the solver so that fitting a head does not import scikit-learn (a second of start-up)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .format import softmax
from .torch_solver import train_torch


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
        w, b, self.n_iter_ = train_torch(x32, y_idx, len(self.classes_), fold, np.array([-1]), np.array([float(self.C)]),
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

