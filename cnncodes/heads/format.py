"""The head file: `LinearHead` (standardise, then one linear score per class) and its HDF5 format.

A `LinearHead` is what every solver ends as; `save`/`load` write and validate the plain HDF5
file (numeric and string datasets, attributes; no pickle) that `predict` and `export` read.
The file is scikit-learn's layout (docs/formats.md, "Head file (HDF5)"): `mean`/`scale` are
`StandardScaler.mean_`/`scale_`, `coef`/`intercept` are `LogisticRegression`'s or `LinearSVC`'s
`coef_`/`intercept_` on the standardised codes, so a 2-class head is ONE row `w` (the score of
classes[1]). In memory a head always holds one row per class (binary: the rows [-w/2, w/2]):
softmax over them is sigmoid(w z + b), argmax is scikit-learn's sign rule, and a classifier
layer (export, LP-FT) needs K rows. `save`/`load` convert; format version 1 files (two rows
for 2 classes) still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import scipy.special

from ..errors import CnnCodesError
from ..runtime import atomic_path, check_replaceable
from ..store.format import FORMAT as CACHE_FORMAT
from ..store.format import STR

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

HEAD_FORMAT = "cnncodes-head"
HEAD_VERSION = 2  # 2: binary heads as scikit-learn's one row; 1: two mirrored rows [-w/2, w/2]
READABLE_VERSIONS = (1, 2)
_IDENTITY_KEYS = ("arch", "weights", "weights_name", "precision")
# The scikit-learn estimator whose objective each --clf minimises (what `to_sklearn` builds).
SKLEARN_ESTIMATORS = {"logreg": "LogisticRegression", "linear": "LogisticRegression", "svm": "LinearSVC",
                      "linear-svm": "LinearSVC"}
_DESCRIPTION = ("linear classifier on CNN codes x: z = (x - mean) / scale, scores = z @ coef.T + intercept, "
                "scikit-learn's layout (StandardScaler, then LogisticRegression or LinearSVC); 2 classes: one row, "
                "the score of classes[1]")
_DATASET_ATTRS = {  # name: (what it is, its shape's meaning); written on every dataset
    "coef": ("weights acting on the STANDARDISED codes z = (x - mean) / scale (scikit-learn coef_)",
             "(K, D): one row per class for K > 2; (1, D) for K = 2: the score of classes[1] "
             "(its probability is sigmoid(z @ coef[0] + intercept[0]))"),
    "intercept": ("biases of the scores (scikit-learn intercept_)", "(K,) for K > 2; (1,) for K = 2, like coef"),
    "mean": ("per-feature mean of the train codes (StandardScaler mean_)", "(D,)"),
    "scale": ("per-feature standard deviation of the train codes, 1 where constant (StandardScaler scale_)", "(D,)"),
    "classes": ("class names in score order (scikit-learn classes_)", "(K,)"),
}


@dataclass
class LinearHead:
    """A fitted head: standardiser + one linear score per class (see `cnncodes.heads`).

    `coef`/`intercept` may be given in scikit-learn's binary form (one row); the head keeps one row
    per class (binary: [-w/2, w/2], whatever two rows a solver gave: the same probabilities)."""

    coef: np.ndarray  # (K, D) on standardised codes
    intercept: np.ndarray  # (K,)
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    classes: list[str]
    clf: str
    C: float
    meta: dict = field(default_factory=dict)  # backbone identity (arch, weights, ...), cv score, tta

    def __post_init__(self):
        if len(self.classes) == 2:  # one canonical binary form, so a head saved and loaded is the same head
            self.coef, self.intercept = as_class_rows(*as_sklearn_rows(self.coef, self.intercept))

    @property
    def n_features(self) -> int:
        return int(self.coef.shape[1])

    def sklearn_coef(self) -> tuple[np.ndarray, np.ndarray]:
        """(coef_, intercept_) in scikit-learn's layout: (1, D), (1,) for 2 classes, else (K, D), (K,)."""
        return as_sklearn_rows(self.coef, self.intercept)

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) acting on raw codes: the standardiser folded into the weights (float64), one row per class."""
        w = self.coef.astype(np.float64) / self.scale.astype(np.float64)
        b = self.intercept.astype(np.float64) - w @ self.mean.astype(np.float64)
        return w, b

    def decision_function(self, codes: np.ndarray) -> np.ndarray:
        """(N, K) class scores for raw (N, D) codes. For 2 classes scikit-learn's decision_function
        (N,) is scores[:, 1] - scores[:, 0]."""
        z = (np.asarray(codes, dtype=np.float64) - self.mean) / self.scale
        return z @ self.coef.T.astype(np.float64) + self.intercept

    def predict_proba(self, codes: np.ndarray) -> np.ndarray:
        """softmax of the scores: probabilities for logreg/linear (for 2 classes softmax over
        [-s/2, s/2] = sigmoid(s), scikit-learn's), a monotone score for svm."""
        return softmax(self.decision_function(codes))

    def predict(self, codes: np.ndarray) -> np.ndarray:
        """Index into `classes` of the best score per row."""
        return self.decision_function(codes).argmax(axis=1)

    def to_sklearn(self) -> Pipeline:
        """This head as a fitted scikit-learn `Pipeline(StandardScaler, LogisticRegression | LinearSVC)`
        (`SKLEARN_ESTIMATORS[clf]`): the same predict (class names), predict_proba (logistic heads) and
        decision_function (scikit-learn's shape) on raw codes; its `classes_` are the class names."""
        from sklearn.pipeline import make_pipeline

        return make_pipeline(self._sklearn_scaler(), self._sklearn_estimator())

    def _sklearn_scaler(self):
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = self.mean.astype(np.float64), self.scale.astype(np.float64)
        scaler.var_ = scaler.scale_ ** 2  # constant features: 1 (the head keeps no other record of them)
        scaler.n_features_in_ = self.n_features
        if "train_codes" in self.meta:
            scaler.n_samples_seen_ = int(self.meta["train_codes"])
        return scaler

    def _sklearn_estimator(self):
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import LinearSVC

        if SKLEARN_ESTIMATORS.get(self.clf) == "LinearSVC":
            est = LinearSVC(C=self.C, multi_class="crammer_singer" if self.clf == "linear-svm" else "ovr")
            est.n_iter_ = 0
        else:
            est = LogisticRegression(C=self.C)
            est.n_iter_ = np.zeros(1, np.int32)
        coef, intercept = self.sklearn_coef()
        est.coef_, est.intercept_ = coef.astype(np.float64), intercept.astype(np.float64)
        est.classes_ = np.array(self.classes)
        est.n_features_in_ = self.n_features
        return est

    def save(self, path: str | Path) -> None:
        """Write the head as HDF5 (numeric and string datasets, attributes; no pickle), atomically.
        An existing file at `path` is replaced only if it is a head (never a cache, say)."""
        check_replaceable(path, "head file (.h5 from `cnncodes fit-head`)", holds_a_head)
        coef, intercept = self.sklearn_coef()
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = HEAD_FORMAT
            f.attrs["format_version"] = HEAD_VERSION
            f.attrs["description"] = _DESCRIPTION
            f.attrs["documentation"] = "docs/formats.md, section 'Head file (HDF5)', in the cnncodes repository"
            f.attrs["clf"] = self.clf
            f.attrs["sklearn_estimator"] = SKLEARN_ESTIMATORS.get(self.clf, "")
            f.attrs["C"] = float(self.C)
            f.attrs["n_classes"] = len(self.classes)
            f.attrs["feature_dim"] = self.n_features
            f.attrs["meta"] = json.dumps(self.meta, sort_keys=True)
            for key in _IDENTITY_KEYS:
                f.attrs[key] = str(self.meta.get(key, ""))
            f.attrs["preprocessing"] = json.dumps(self.meta.get("preprocessing", {}))
            f.create_dataset("coef", data=coef.astype(np.float32))
            f.create_dataset("intercept", data=intercept.astype(np.float32))
            f.create_dataset("mean", data=self.mean.astype(np.float32))
            f.create_dataset("scale", data=self.scale.astype(np.float32))
            f.create_dataset("classes", data=np.array(self.classes, dtype=object), dtype=STR)
            for name, (what, shape) in _DATASET_ATTRS.items():
                f[name].attrs["description"] = what
                f[name].attrs["shape"] = shape

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


def holds_a_head(path: Path) -> bool:
    """True for an HDF5 file whose format attribute says it is a head."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == HEAD_FORMAT
    except OSError:
        return False


def _read_head(f: h5py.File, path: Path) -> LinearHead:
    if f.attrs.get("format") != HEAD_FORMAT:
        what = "a cnncodes cache, not a head" if f.attrs.get("format") == CACHE_FORMAT else "not a cnncodes head"
        raise CnnCodesError(f"{path}: HDF5 file but {what} (no format={HEAD_FORMAT} attribute); "
                            f"create a head with `cnncodes fit-head CACHE -o HEAD.h5`")
    version = int(f.attrs.get("format_version", -1))
    if version not in READABLE_VERSIONS:
        raise CnnCodesError(f"{path}: head format version {f.attrs.get('format_version')} is not supported "
                            f"(this cnncodes reads {', '.join(map(str, READABLE_VERSIONS))}); upgrade cnncodes or re-fit it")

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
    rows = 1 if k == 2 and version >= 2 else k  # version 1 stored binary heads as two rows
    expected = {"coef": (rows, d), "intercept": (rows,), "mean": (d,), "scale": (d,)}
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
    """Row-wise softmax of (N, K) class scores (scipy's, stable for large scores)."""
    return scipy.special.softmax(scores, axis=1)


def as_class_rows(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's binary (1, D) form -> the two-row form [-w/2, w/2]; (K, D) unchanged.
    softmax over the two rows' scores [-s/2, s/2] is sigmoid(s): scikit-learn's probabilities."""
    coef, intercept = np.atleast_2d(coef), np.atleast_1d(intercept)
    if coef.shape[0] == 1:
        return np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef, intercept


def as_sklearn_rows(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Any two class rows (r0, r1) -> scikit-learn's binary form: the one row r1 - r0 (the score of
    class 1 minus that of class 0: softmax over two scores is the sigmoid of their difference);
    one row or K > 2 rows unchanged."""
    coef, intercept = np.atleast_2d(coef), np.atleast_1d(intercept)
    if coef.shape[0] == 2:
        return coef[1:] - coef[:1], intercept[1:] - intercept[:1]
    return coef, intercept


def head_meta(cache, selection, tta: bool) -> dict:
    """What a head records about where it came from: the backbone identity, preprocessing, CV outcome."""
    from .. import __version__

    cfg = cache.config
    return {"arch": cfg.arch, "weights": cfg.weights, "weights_name": cfg.weights_name, "precision": cfg.precision,
            "preprocessing": cfg.preprocessing, "feature_dim": cache.feature_dim, "cache": str(cache.path),
            "layers": getattr(cfg, "layers", ""), "train_codes": int(cache.features("train").shape[0]),
            "cv": selection.to_dict(), "tta": tta, "cnncodes_version": __version__}
