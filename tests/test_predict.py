"""predict and export: a head runs on its own backbone, and its export reproduces it exactly."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import write_folder

from cnncodes.errors import CnnCodesError
from cnncodes.extract import extract
from cnncodes.heads import LinearHead, fit_head
from cnncodes.predict import export_head, load_model, predict
from cnncodes.store import Cache


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """64 px two-class folder, its resnet18 (random weights) cache with views, and a logreg head."""
    root = tmp_path_factory.mktemp("pred")
    data = write_folder(root / "data", {"train": 6, "val": 3})
    cache = root / "codes.h5"
    extract(data, cache, arch="resnet18", weights="none", image_size=64, views=1, eval_views=1, workers=0,
            progress=False, log=lambda m: None)
    head, _ = fit_head(cache, "logreg", "auto")
    head.save(root / "head.h5")
    return {"root": root, "data": data, "cache": cache, "head": root / "head.h5"}


def _by_relpath(preds, data: Path) -> dict[str, np.ndarray]:
    return {str(Path(r["path"]).resolve().relative_to(data.resolve())): s for r, s in zip(preds.rows, preds.scores)}


def test_predict_with_a_head_reproduces_the_cached_codes(trained):
    """Same backbone, weights and preprocessing as extract: scores equal the head on cached codes."""
    preds = predict(trained["head"], [trained["data"] / "val"], device="cpu", workers=0)
    head = LinearHead.load(trained["head"])
    with Cache(trained["cache"]) as c:
        x, paths, views = c.features("val")[()], c.paths("val"), c.views("val")
    expected = dict(zip(paths[views == 0], head.decision_function(x[views == 0])))
    got = _by_relpath(preds, trained["data"])
    assert sorted(got) == sorted(expected) and len(got) == 6
    for path, scores in got.items():
        np.testing.assert_allclose(scores, expected[path], rtol=1e-3, atol=1e-3)
    assert {r["true"] for r in preds.rows} == {"cat", "dog"} and preds.accuracy()["all"]["images"] == 6


def test_labels_come_from_class_folders_and_splits(trained):
    from cnncodes.predict import collect_inputs

    items, skipped = collect_inputs([trained["data"], trained["data"] / "val" / "dog"], ["cat", "dog"])
    assert len(items) == 18 + 3 and not skipped
    assert {(i.split, i.true) for i in items[:18]} == {(s, c) for s in ("train", "val") for c in ("cat", "dog")}
    assert {(i.split, i.true) for i in items[18:]} == {(None, "dog")}


def test_export_loads_strictly_in_torchvision_and_reproduces_predict(trained, tmp_path):
    out = export_head(trained["head"], tmp_path / "model.pt")
    state = torch.load(out, map_location="cpu", weights_only=True)
    model = torchvision.models.resnet18(num_classes=2)
    model.load_state_dict(state, strict=True)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["arch"] == "resnet18" and meta["preprocessing"]["crop"] == 64
    inputs = [trained["data"] / "val", trained["data"] / "train" / "dog" / "000.jpg"]
    with_head = predict(trained["head"], inputs, device="cpu", workers=0)
    with_export = predict(out, inputs, device="cpu", workers=0)
    assert [r["path"] for r in with_head.rows] == [r["path"] for r in with_export.rows]
    np.testing.assert_allclose(with_export.scores, with_head.scores, rtol=1e-4, atol=1e-4)
    assert [r["pred"] for r in with_head.rows] == [r["pred"] for r in with_export.rows]
    assert load_model(out).kind == "classifier"


def test_cli_predict_folder_with_bad_files_writes_csv_json_and_grid(cli, trained, tmp_path):
    folder = tmp_path / "val"
    shutil.copytree(trained["data"] / "val", folder)
    (folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "cat" / "notes.txt").write_text("hello")
    proc = cli("predict", trained["head"], folder, "-o", tmp_path / "p.csv", "--grid", tmp_path / "g.png",
               "--device", "cpu", "--workers", "0")
    assert re.search(r"^accuracy \d\.\d{4} \(\d/6 labelled images\)$", proc.stdout, re.MULTILINE), proc.stdout
    assert "broken.jpg" in proc.stderr and "notes.txt" in proc.stderr and "Traceback" not in proc.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").read_text().splitlines()))
    assert len(rows) == 6 and set(rows[0]) == {"path", "pred", "score", "true"}
    assert all(0.5 <= float(r["score"]) <= 1 and r["pred"] in ("cat", "dog") for r in rows)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    proc = cli("predict", trained["head"], folder / "dog" / "000.jpg", "-o", tmp_path / "p.json", "--workers", "0")
    report = json.loads((tmp_path / "p.json").read_text())
    assert len(report["predictions"]) == 1 and report["predictions"][0]["true"] is None and report["accuracy"] == {}


def test_cli_refuses_other_weights_and_foreign_heads(cli, trained, tmp_path):
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"definitely not hdf5")
    cases = [
        (("predict", trained["head"], trained["data"] / "val", "--weights", other),
         "head was trained on codes of weights none (none:seed0), you gave"),
        (("predict", garbage, trained["data"] / "val"), "not a readable HDF5 head file"),
        (("export", trained["cache"], "-o", tmp_path / "m.pt"), "a cnncodes cache, not a head"),
    ]
    for args, message in cases:
        proc = cli(*args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_grid_or_confusion_suffix_matplotlib_cannot_write_fails_before_any_work(cli, trained, tmp_path):
    proc = cli("predict", trained["head"], trained["data"] / "val", "-o", tmp_path / "p.csv", "--grid", tmp_path / "g.csv",
               "--workers", "0", check=False)
    assert proc.returncode == 2 and "g.csv: matplotlib cannot write .csv images" in proc.stderr and ".png" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "p.csv").exists()  # refused before predicting
    proc = cli("fit-head", trained["cache"], "-o", tmp_path / "h.h5", "--confusion", tmp_path / "c.bmp", check=False)
    assert proc.returncode == 2 and "c.bmp: matplotlib cannot write .bmp images" in proc.stderr
    assert not (tmp_path / "h.h5").exists()
    cli("fit-head", trained["cache"], "-o", tmp_path / "h.h5", "--C", "1", "--confusion", tmp_path / "c.svg")
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:400]


def test_head_whose_weights_file_is_gone(trained, tmp_path):
    head = LinearHead.load(trained["head"])
    head.meta.update(weights="file:sha256:" + "0" * 64, weights_name=str(tmp_path / "moved.pth"))
    head.save(tmp_path / "h.h5")
    with pytest.raises(CnnCodesError, match="moved.pth .* which is not there; pass --weights PATH"):
        load_model(tmp_path / "h.h5")


def test_classifier_refuses_weights_and_missing_inputs(trained, tmp_path):
    out = export_head(trained["head"], tmp_path / "m.pt")
    with pytest.raises(CnnCodesError, match="carries its own weights"):
        load_model(out, weights="none")
    with pytest.raises(CnnCodesError, match="no images to predict"):
        predict(out, [tmp_path / "nothing-here"], device="cpu")


def test_predict_takes_a_finetune_run_folder_and_names_its_other_files(cli, trained, tmp_path):
    """`predict RUN_DIR` uses the run's final model.pt; its model.json or checkpoint.pt get an error saying what they are."""
    from cnncodes.finetune import finetune

    run = tmp_path / "run"
    finetune(trained["data"], run, arch="resnet18", weights="none", epochs=1, batch_size=4, image_size=32, workers=0,
             device="cpu", echo=lambda _: None)
    val = trained["data"] / "val"
    by_folder = cli("predict", run, val, "--workers", "0")
    by_file = cli("predict", run / "model.pt", val, "--workers", "0")
    assert by_folder.stdout == by_file.stdout and "accuracy" in by_folder.stdout and len(by_folder.stdout.splitlines()) == 7
    cases = [(run / "model.json", f"{run / 'model.json'} is the metadata (class names, preprocessing) of the classifier model.pt; "
                                  "pass the run folder or its model.pt"),
             (run / "checkpoint.pt", "is a fine-tuning checkpoint (to --resume the run), not a classifier"),
             (trained["root"], "a folder without model.pt, so not a finished `cnncodes finetune` run")]
    for model, message in cases:
        proc = cli("predict", model, val, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (run / "model.pt").unlink()
    proc = cli("predict", run, val, check=False)
    assert proc.returncode == 2 and "only checkpoint.pt: the run is unfinished; rerun it with --resume" in proc.stderr
