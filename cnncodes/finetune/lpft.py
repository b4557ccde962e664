"""LP-FT: a `fit-head` head as fine-tuning's starting classifier (`--init-head HEAD.h5`).

Linear probing then fine-tuning (Kumar et al., ICLR 2022) starts the end-to-end run from the
linear head trained on the frozen codes instead of a random classifier. Every `fit-head` head,
whatever its --clf, is stored in the same linear form `coef @ (x - mean) / scale + intercept`,
so it becomes a Linear on raw codes by folding the standardiser in:
W' = coef / scale, b' = intercept - W' @ mean (`LinearHead.folded`). Its logits on the codes
the cache holds are the head's decision values, so the run's epoch-0 accuracy is the head's.

head file -> `load_init_head` (checked against the run: arch, weights, preprocessing, classes)
-> `InitHead` (W', b' in the run's class order, and the file's identity for the Recipe).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import Preprocessing
from ..errors import CnnCodesError
from ..runtime import file_sha256

# Preprocessing fields that only shape the random training views: a head's codes never saw them.
_TRAIN_ONLY = ("view_scale",)


@dataclass(frozen=True)
class InitHead:
    """A head folded for raw codes, rows in the run's class order."""

    path: Path
    weight: np.ndarray  # (K, D) float64
    bias: np.ndarray  # (K,) float64
    identity: str  # "sha256:<hex>" of the head file: the Recipe's init_head
    clf: str
    C: float

    def describe(self) -> str:
        return f"{self.path} ({self.clf}, C={self.C:g}, {self.weight.shape[1]}-d codes)"


def file_identity(path: Path) -> str:
    return f"sha256:{file_sha256(path)}"


def _eval_preprocessing(d: dict) -> dict:
    """What decides a code: the preprocessing normalised through `Preprocessing`, training-only fields dropped."""
    full = Preprocessing.from_dict(d).to_dict()
    return {k: v for k, v in full.items() if k not in _TRAIN_ONLY}


def mismatches(meta: dict, classes: Sequence[str], arch: str, weights_identity: str,
               preprocessing: Preprocessing, head_classes: Sequence[str]) -> list[str]:
    """What differs between a head (its meta and classes) and the run; empty when it fits."""
    out = []
    if meta.get("layers"):
        out.append(f"codes: the head was fitted on intermediate layers ({meta['layers']}), not on the classifier's "
                   f"input; LP-FT needs a head on codes extracted without --layer")
    if meta.get("arch") != arch:
        out.append(f"arch: head {meta.get('arch')}, run {arch} (pass --arch {meta.get('arch')})")
    if meta.get("weights") != weights_identity:
        out.append(f"weights: head {meta.get('weights_name')} ({meta.get('weights')}), run {weights_identity} "
                   f"(pass --weights {meta.get('weights_name')})")
    try:
        head_prep = _eval_preprocessing(meta.get("preprocessing") or {})
    except (TypeError, ValueError) as e:
        out.append(f"preprocessing: unreadable in the head ({e})")
    else:
        run_prep = _eval_preprocessing(preprocessing.to_dict())
        diffs = [f"{k} {head_prep.get(k)} vs {run_prep.get(k)}" for k in sorted(set(head_prep) | set(run_prep))
                 if head_prep.get(k) != run_prep.get(k)]
        if diffs:
            hint = f" (pass --image-size {head_prep['crop']})" if head_prep.get("crop") != run_prep.get("crop") else ""
            out.append(f"preprocessing (head vs run): {', '.join(diffs)}{hint}")
    missing, extra = sorted(set(classes) - set(head_classes)), sorted(set(head_classes) - set(classes))
    if missing or extra:
        out.append("classes: " + "; ".join(([f"data has {', '.join(missing)} not in the head"] if missing else []) +
                                           ([f"head has {', '.join(extra)} not in the data"] if extra else [])))
    return out


def load_init_head(path: str | Path, arch: str, weights_identity: str, preprocessing: Preprocessing,
                   classes: Sequence[str]) -> InitHead:
    """Read a head and check it fits the run; one CnnCodesError line naming every difference otherwise."""
    from ..heads import LinearHead  # h5py and scikit-learn: only when a head is given
    from ..heads.multi import refuse_fused

    path = Path(path)
    head = LinearHead.load(path)
    refuse_fused(head.meta, "--init-head")
    problems = mismatches(head.meta, classes, arch, weights_identity, preprocessing, head.classes)
    if problems:
        raise CnnCodesError(f"{path}: --init-head does not fit this run: {'; '.join(problems)}; "
                            f"or fit a head on a cache extracted like this run (`cnncodes extract` then `fit-head`)")
    w, b = head.folded()
    order = [head.classes.index(c) for c in classes]  # the run's class order (sorted folders)
    return InitHead(path, w[order], b[order], file_identity(path), head.clf, float(head.C))
