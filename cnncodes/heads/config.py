"""`HeadConfig`: every option of fitting a head, held once and validated once. Torch- and
numpy-free: the CLI builds `cnncodes fit-head`'s options from these fields (flag, default, help)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import option
from ..errors import CnnCodesError
from .names import C_GRID, CLFS, PATIENCE


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


@dataclass(frozen=True)
class HeadConfig:
    """The options of `fit_head`, in the CLI's order; invalid values raise CnnCodesError.
    Change a copy with `dataclasses.replace(config, clf="svm")` (validated again)."""

    clf: str = option("logreg", "svm: LinearSVC's objective; logreg: softmax regression; linear / linear-svm: torch heads "
                                "that stream the cache.")
    C: float | str = option("auto", "Inverse regularisation, or 'auto': grouped cross-validation on train only.")
    folds: int = option(5, "CV folds for --C auto (<= 50k codes).")
    tta: bool = option(False, "Score held-out images by averaging all their stored views (extract --eval-views).")
    allow_unseen_classes: bool = option(False, "Report even if a held-out class has no training images.")
    max_iter: int | None = option(None, "Epochs of the torch heads [default: ~1000 steps, >= 3].")
    device: str = option("auto", "Torch heads: auto, cpu, cuda or cuda:N.")
    seed: int = option(0, "Seed of the folds and of the torch heads.")
    exclude: tuple[str, ...] = option((), "CSV with a path column (e.g. audit's label_issues.csv, leaks.csv): its "
                                          "train images are left out of the fit, its val/test images are scored "
                                          "apart (accuracy with and without them). Repeatable.")
    # API only: the C values --C auto searches, and how many larger C without a better CV accuracy
    # stop the svm/logreg C path (None: the whole grid)
    grid: tuple[float, ...] = C_GRID
    patience: int | None = PATIENCE

    def __post_init__(self) -> None:
        if self.clf not in CLFS:
            raise CnnCodesError(f"unknown --clf '{self.clf}'; choose one of: {', '.join(CLFS)}")
        parse_C(self.C)
        checks = [
            (self.folds >= 2, f"--folds must be >= 2, got {self.folds}"),
            (self.max_iter is None or self.max_iter >= 1, f"--epochs must be >= 1, got {self.max_iter} "
                                                          f"(omit it for ~1000 steps)"),
            (len(self.grid) >= 1 and all(c > 0 for c in self.grid), "the C grid must hold positive values"),
            (self.patience is None or self.patience >= 1, "patience must be >= 1 (or None: the whole grid)"),
        ]
        for ok, message in checks:
            if not ok:
                raise CnnCodesError(message)
        object.__setattr__(self, "grid", tuple(sorted(float(c) for c in self.grid)))  # frozen: normalised once
        exclude = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        object.__setattr__(self, "exclude", tuple(str(e) for e in exclude))

    @property
    def fixed_C(self) -> float | None:
        """C as a number, or None for 'auto' (chosen by cross-validation)."""
        return parse_C(self.C)
