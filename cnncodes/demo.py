"""The embedded default dataset (scikit-learn's bundled digits as an image folder) and the demo run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DIGITS_SIZE = 32  # px; the 8x8 originals upscaled so they look like images, not specks


def write_digits(dest: str | Path) -> Path:
    """Write scikit-learn's 1,797 digits as DEST/{train,val}/<digit>/<n>.png (every 5th to val).

    Needs no download: the data ships inside scikit-learn. Idempotent.
    """
    from sklearn.datasets import load_digits

    dest = Path(dest)
    marker = dest / ".complete"
    if marker.exists():
        return dest
    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        split = "val" if i % 5 == 0 else "train"
        folder = dest / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((255 - pixels * (255 / 16)).astype(np.uint8), "L")  # dark ink on white
        img.resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC).save(folder / f"{i:04d}.png")
    marker.write_text("ok\n")
    return dest
