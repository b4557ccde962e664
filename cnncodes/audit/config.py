"""`AuditConfig`: every option of `cnncodes audit` beyond the head's, held once and validated once.
Torch- and numpy-free: the CLI builds its options from these fields (flag, default, help)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import option
from ..errors import CnnCodesError

# Cosine of the codes (centred on the train mean) from which two images are near-duplicates. Why 0.90
# (bench/results/audit_threshold.json: ants/bees, MobileNetV2 and ResNet-50 codes): no two distinct images reach
# 0.81, and every val image recompressed at JPEG quality 85 and resized to 90% scores >= 0.92 with its copy.
# Mirrored copies reach it 18 and 25 times in 30, crops to the central 80% 2 and 7 times, grayscale copies never:
# lower --near to catch those (at the price of distinct look-alikes).
NEAR = 0.90
# Above this cosine a pair's decoded pixels are compared: identical pixels give identical codes (up to float
# rounding of the batch), so an exact duplicate whose bytes differ (re-saved, metadata stripped) is found here.
PIXEL_CHECK = 0.9999
EXACT_UP_TO = 100_000  # codes up to which `search auto` scans every pair (blocked matmul); beyond, faiss if installed
SEARCHES = ("auto", "exact", "faiss")
OUTLIER_Z = 5.0  # robust z-score of the neighbour distance (median, 1.4826 MAD over train) above which an image is flagged


@dataclass(frozen=True)
class AuditConfig:
    """The options of `audit` (the head's are a `HeadConfig`); invalid values raise CnnCodesError."""

    data: str | None = option(None, "The images (the DATA given to extract): their bytes are hashed for exact "
                                    "duplicates and they are drawn in the pictures [default: a CSV manifest's "
                                    "folder, as the cache records it; else codes only, no pictures].")
    near: float = option(NEAR, "Near-duplicate threshold: cosine of the codes centred on the train mean.")
    neighbours: int = option(10, "Nearest neighbours per image searched (near-duplicates, outlier score).")
    search: str = option("auto", f"Neighbour search: exact (blocked matmul over every pair), faiss (IVF index, "
                                 f"optional), or auto (exact up to {EXACT_UP_TO:,} codes, then faiss if installed).")
    outlier_z: float = option(OUTLIER_Z, "Outliers: robust z-score of the mean distance to the nearest neighbours "
                                         "(median and MAD of train) above which an image is listed.")
    pictures: int = option(16, "Images per picture of each finding (0: no pictures).")

    def __post_init__(self) -> None:
        checks = [
            (0 < self.near <= 1, f"--near must be in (0, 1], got {self.near}"),
            (self.neighbours >= 1, f"--neighbours must be >= 1, got {self.neighbours}"),
            (self.search in SEARCHES, f"--search must be one of {', '.join(SEARCHES)}, got {self.search!r}"),
            (math.isfinite(self.outlier_z) and self.outlier_z > 0, f"--outlier-z must be > 0, got {self.outlier_z}"),
            (self.pictures >= 0, f"--pictures must be >= 0, got {self.pictures}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CnnCodesError(message)
