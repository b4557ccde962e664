"""Shared fixtures: small generated image folders (64 px, learnable) and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"
RESNET50_KERAS = SHARED / "weights" / "resnet50-imagenet-keras.pth"


def make_image(label: int, index: int, size: int = 64) -> Image.Image:
    """A class-dependent picture: class k has a bright stripe pattern at angle k plus noise."""
    rng = np.random.default_rng(1000 * label + index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.pi * label / 4
    wave = np.sin(2 * np.pi * 3 * (xx * np.cos(angle) + yy * np.sin(angle)))
    base = np.stack([wave * (1 if c == label % 3 else 0.3) for c in range(3)], axis=-1)
    img = 127 + 100 * base + rng.normal(0, 20, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_folder(root: Path, splits: dict[str, int] | None = None, classes=("cat", "dog"), size: int = 64,
                 ext: str = ".jpg") -> Path:
    """root/<split>/<class>/<i>.jpg with `splits[split]` images per class (None: no split level)."""
    splits = {"train": 6, "val": 3} if splits is None else splits
    for s_i, (split, n) in enumerate(splits.items()):
        for label, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make_image(label, 100 * s_i + i, size).save(folder / f"{i:03d}{ext}", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """train (6 per class) + val (3 per class), two classes, 64 px JPEGs."""
    return write_folder(tmp_path / "data")


def run_cli(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None,
            cwd: str | os.PathLike | None = None, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI as a user would and capture its output.

    In-process through click's runner by default (no torch import per call); with
    `subprocess_=True`, as a real `python -m cnncodes` process. An unexpected exception
    is written to stderr as a traceback either way, so tests can assert there is none.
    """
    if subprocess_ or env or cwd:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "cnncodes", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=cwd)
    else:
        proc = _run_in_process([str(a) for a in args])
    if check and proc.returncode != 0:
        raise AssertionError(f"cnncodes {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _run_in_process(args: list[str]) -> subprocess.CompletedProcess:
    import traceback

    from click.testing import CliRunner

    from cnncodes.cli import cli as cli_group

    result = CliRunner().invoke(cli_group, args, prog_name="cnncodes")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(["cnncodes", *args], result.exit_code, result.stdout, stderr)


@pytest.fixture
def cli():
    return run_cli
