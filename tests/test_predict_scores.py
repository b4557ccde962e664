"""`cnncodes predict --scores`: every class's probability, as torchvision/timm inference scripts give it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_folder

from cnncodes.heads import LinearHead
from cnncodes.predictions import CSV_HEADER, score_columns
from cnncodes.store import Cache

CLASSES = ("ant", "bee", "wasp")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict:
    """A 3-class logreg head from the CLI (resnet18, random weights, 32 px) and the codes it saw."""
    root = tmp_path_factory.mktemp("scores")
    data = write_folder(root / "data", {"train": 5, "val": 3}, classes=CLASSES, size=32)
    cache, head = root / "c.h5", root / "head.h5"
    run_cli("extract", data, "-o", cache, "--weights", "none", "--image-size", "32", "--workers", "0")
    run_cli("fit-head", cache, "-o", head, "--clf", "logreg", "--C", "1")
    with Cache(cache) as c:
        codes = dict(zip(c.paths("val"), LinearHead.load(head).predict_proba(c.features("val")[()])))
    return {"data": data, "head": head, "expected": codes, "root": root}


def _relative(path: str, data: Path) -> str:
    return str(Path(path).resolve().relative_to(data.resolve()))


def test_csv_has_one_probability_column_per_class(fitted):
    out = fitted["root"] / "preds.csv"
    run_cli("predict", fitted["head"], fitted["data"] / "val", "-o", out, "--scores", "--workers", "0")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
        f.seek(0)
        assert next(csv.reader(f)) == [*CSV_HEADER, *CLASSES]
    assert len(rows) == 3 * len(CLASSES)
    for r in rows:
        p = np.array([float(r[c]) for c in CLASSES])
        assert abs(p.sum() - 1) < 1e-5 and r["pred"] == CLASSES[int(p.argmax())]
        assert float(r["score"]) == pytest.approx(p.max(), abs=1e-6)
        # the head's probabilities on the cached codes of the same image (same backbone and preprocessing)
        np.testing.assert_allclose(p, fitted["expected"][_relative(r["path"], fitted["data"])], atol=1e-3)
    # a --scores file is a predictions file: the next predict may replace it, with or without --scores
    run_cli("predict", fitted["head"], fitted["data"] / "val", "-o", out, "--workers", "0")
    assert out.read_text().splitlines()[0] == ",".join(CSV_HEADER)


def test_json_rows_carry_a_class_to_probability_dict(fitted):
    out = fitted["root"] / "preds.json"
    run_cli("predict", fitted["head"], fitted["data"] / "val", "-o", out, "--scores", "--workers", "0")
    doc = json.loads(out.read_text())
    assert doc["classes"] == list(CLASSES) and len(doc["predictions"]) == 3 * len(CLASSES)
    for r in doc["predictions"]:
        assert list(r["scores"]) == list(CLASSES)
        p = np.array(list(r["scores"].values()))
        assert r["pred"] == max(r["scores"], key=r["scores"].get) and r["score"] == pytest.approx(p.max(), rel=1e-12)
        np.testing.assert_allclose(p, fitted["expected"][_relative(r["path"], fitted["data"])], atol=1e-3)
    plain = fitted["root"] / "plain.json"
    run_cli("predict", fitted["head"], fitted["data"] / "val", "-o", plain, "--workers", "0")
    assert all("scores" not in r for r in json.loads(plain.read_text())["predictions"])


def test_screen_output_names_every_class(fitted):
    proc = run_cli("predict", fitted["head"], fitted["data"] / "val" / "bee", "--scores", "--workers", "0")
    lines = [line.split("\t") for line in proc.stdout.splitlines() if "\t" in line]
    assert len(lines) == 3
    for path, pred, score, *every in lines:
        probs = dict(item.split("=") for item in every)
        assert list(probs) == list(CLASSES) and abs(sum(map(float, probs.values())) - 1) < 1e-3


def test_a_class_named_like_a_fixed_column_gets_a_prefix():
    assert score_columns(["cat", "path", "score"]) == ["cat", "score:path", "score:score"]
