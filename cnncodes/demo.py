"""The embedded default dataset (scikit-learn's bundled digits as an image folder) and the demo run."""

from __future__ import annotations

import dataclasses
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


def run_demo(workdir: str | Path = "cnncodes-demo", arch: str = "resnet18", weights: str = "DEFAULT",
             image_size: int = 64, clf: str = "logreg", log=print) -> dict:
    """The whole frozen-extractor path on the embedded digits: extract, fit a head, report.

    Pretrained torchvision weights are used when they can be had (TORCH_HOME cache or a
    download); offline, the demo says so and falls back to random weights.
    """
    from .backbones import check_arch, create_model
    from .errors import CnnCodesError
    from .extract import ExtractConfig, extract
    from .heads import fit_head

    check_arch(arch)  # a misspelt arch is an error, not a fallback to random weights
    config = ExtractConfig(arch=arch, weights=weights, image_size=image_size)  # checked before any work
    workdir = Path(workdir)
    data = write_digits(workdir / "digits")
    log(f"dataset: scikit-learn digits written to {data} (train 1437, val 360 images, 10 classes)")
    try:
        create_model(arch, weights)
    except CnnCodesError as e:
        log(f"note: {e}")
        log("note: continuing with --weights none (random weights): codes are weaker than pretrained ones")
        config = dataclasses.replace(config, weights="none")
    cache = workdir / f"digits-{arch}.h5"
    r = extract(data, cache, config, overwrite=True, log=log)
    log(f"extract: {r.extracted} images in {r.seconds:.1f} s ({r.images_per_s:.0f} img/s) -> {cache}")
    head, report = fit_head(cache, clf=clf, log=log)
    head_path = workdir / f"digits-{arch}-{clf}.h5"
    head.save(head_path)
    val = report["splits"]["val"]
    log(f"fit-head --clf {clf}: C={report['C']:g} chosen by grouped 5-fold CV on train only, "
        f"fit in {report['fit_seconds']:.1f} s -> {head_path}")
    log(f"val accuracy {val['accuracy']:.4f} on {val['images']} held-out images (val never used for any choice)")
    return {"extract": r, "report": report, "head": head_path, "weights": config.weights}
