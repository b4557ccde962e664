"""The head file: `LinearHead` (standardise, then one linear score per class) and its HDF5 format.

A `LinearHead` is what every solver ends as; `save`/`load` write and validate the plain HDF5
file (numeric and string datasets, attributes; no pickle) that `predict` and `export` read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import scipy.special

from ..errors import CnnCodesError
from ..runtime import atomic_path, check_replaceable
from ..store.format import FORMAT as CACHE_FORMAT
from ..store.format import STR

HEAD_FORMAT = "cnncodes-head"
HEAD_VERSION = 1
_IDENTITY_KEYS = ("arch", "weights", "weights_name", "precision")


@dataclass
class LinearHead:
    """A fitted head: standardiser + one linear score per class (see `cnncodes.heads`)."""

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
        """Write the head as HDF5 (numeric and string datasets, attributes; no pickle), atomically.
        An existing file at `path` is replaced only if it is a head (never a cache, say)."""
        check_replaceable(path, "head file (.h5 from `cnncodes fit-head`)", holds_a_head)
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
            f.create_dataset("classes", data=np.array(self.classes, dtype=object), dtype=STR)

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
    """Row-wise softmax of (N, K) class scores (scipy's, stable for large scores)."""
    return scipy.special.softmax(scores, axis=1)


def as_class_rows(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's binary (1, D) form -> the two-row form [-w/2, w/2]; (K, D) unchanged."""
    coef, intercept = np.atleast_2d(coef), np.atleast_1d(intercept)
    if coef.shape[0] == 1:
        return np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef, intercept



def head_meta(cache, selection, tta: bool) -> dict:
    """What a head records about where it came from: the backbone identity, preprocessing, CV outcome."""
    from .. import __version__

    cfg = cache.config
    return {"arch": cfg.arch, "weights": cfg.weights, "weights_name": cfg.weights_name, "precision": cfg.precision,
            "preprocessing": cfg.preprocessing, "feature_dim": cache.feature_dim, "cache": str(cache.path),
            "layers": getattr(cfg, "layers", ""),
            "cv": selection.to_dict(), "tta": tta, "cnncodes_version": __version__}
