"""CSV manifests: the same codes as the folder, predict with accuracy, incremental rows, bad manifests, --val-fraction."""

from __future__ import annotations

import csv
import json
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, write_folder

from cnncodes.data import discover
from cnncodes.errors import CnnCodesError
from cnncodes.extract import extract
from cnncodes.manifest import ManifestOptions, read_manifest
from cnncodes.heads import fit_head
from cnncodes.predict import collect_inputs, predict
from cnncodes.predictions import draw_grid
from cnncodes.store import Cache

FAST = ("--weights", "none", "--image-size", "64", "--workers", "0", "-q")


def write_manifest(path: Path, rows: list[list[str]], header=("path", "label", "split")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def folder_rows(data: Path, prefix: str) -> list[list[str]]:
    """The folder's images as manifest rows, in the folder's own order (split, class, name)."""
    layout = discover(data)
    return [[f"{prefix}{f.path}", layout.classes[f.label], split] for split, files in layout.splits.items() for f in files]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> dict:
    """One folder extracted twice: as a folder, and through a manifest with relative and absolute paths."""
    root = tmp_path_factory.mktemp("manifest")
    data = write_folder(root / "data", {"train": 4, "val": 2})
    rows = folder_rows(data, "data/")
    rows[1][0] = str((root / rows[1][0]).resolve())  # an absolute path is used as written
    manifest = write_manifest(root / "labels.csv", rows)
    kwargs = dict(arch="resnet18", weights="none", image_size=64, workers=0, progress=False, log=lambda m: None)
    extract(data, root / "folder.h5", **kwargs)
    extract(manifest, root / "csv.h5", **kwargs)
    return {"root": root, "data": data, "manifest": manifest, "rows": rows, "kwargs": kwargs}


def test_manifest_codes_equal_the_folders(extracted):
    root, rows = extracted["root"], extracted["rows"]
    with Cache(root / "folder.h5") as a, Cache(root / "csv.h5") as b:
        assert a.classes == b.classes == ["cat", "dog"]
        assert a.manifest is None
        rec = b.manifest
        assert rec["path"] == str(extracted["manifest"].resolve()) and rec["splits_from"] == "column"
        assert rec["sha256"] == hashlib.sha256(extracted["manifest"].read_bytes()).hexdigest()
        for split in ("train", "val"):
            written = [r[0] for r in rows if r[2] == split]
            assert list(b.paths(split)) == written  # each row's path as written, absolute one included
            as_folder = [str(Path(p).resolve().relative_to(extracted["data"].resolve())) if Path(p).is_absolute()
                         else p.removeprefix("data/") for p in written]
            assert list(a.paths(split)) == as_folder
            np.testing.assert_array_equal(a.labels(split), b.labels(split))
            np.testing.assert_allclose(a.features(split)[()], b.features(split)[()], rtol=1e-5, atol=1e-6)


def test_predict_on_a_manifest_prints_accuracy_and_keeps_its_paths(extracted, tmp_path, cli):
    root = extracted["root"]
    cli("fit-head", root / "csv.h5", "-o", tmp_path / "head.h5", "--clf", "logreg", "--C", "1")
    rows = [r for r in extracted["rows"] if r[2] == "val"]
    manifest = write_manifest(root / "renamed.csv", [[p, lab] for p, lab, _ in rows] + [["data/gone.jpg", "cat"]],
                              header=("file", "class"))
    out = tmp_path / "preds.csv"
    r = cli("predict", tmp_path / "head.h5", manifest, "-o", out, "--path-col", "file", "--label-col", "class",
            "--device", "cpu", "--workers", "0")
    assert re.search(r"^accuracy [01]\.\d{4} \([0-4]/4 labelled images\)$", r.stdout, re.M)
    assert "skipped data/gone.jpg: no such file (renamed.csv line 6)" in r.stderr
    with open(out, newline="") as f:
        got = list(csv.DictReader(f))
    unlabelled = write_manifest(root / "nolabel.csv", [[p] for p, _, _ in rows], header=("path",))
    items, skipped = collect_inputs([unlabelled], ["cat", "dog"])
    assert [(i.name, i.true, i.split) for i in items] == [(p, None, None) for p, _, _ in rows] and not skipped
    assert [g["path"] for g in got] == [p for p, _, _ in rows]
    assert [g["true"] for g in got] == [lab for _, lab, _ in rows]


def test_the_grid_draws_a_manifests_images_from_any_folder(extracted, tmp_path, monkeypatch):
    """A manifest's paths are relative to the manifest, not to the working folder: every panel loads its image."""
    import cnncodes.data

    head, _ = fit_head(extracted["root"] / "csv.h5", "logreg", 1.0)
    head.save(tmp_path / "head.h5")
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    preds = predict(tmp_path / "head.h5", [extracted["manifest"]], device="cpu", workers=0)
    assert sum(not Path(r["path"]).is_absolute() for r in preds.rows) == len(preds.rows) - 1  # shown as written
    loaded, load_rgb = [], cnncodes.data.load_rgb
    monkeypatch.setattr(cnncodes.data, "load_rgb", lambda path, *a: loaded.append(Path(path)) or load_rgb(path, *a))
    draw_grid(preds, tmp_path / "grid.png")
    assert len(loaded) == len(preds.rows) == 12 and all(p.is_file() for p in loaded)
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_an_appended_row_is_extracted_and_nothing_else(extracted, tmp_path):
    root, kwargs = extracted["root"], extracted["kwargs"]
    rows = [r for r in extracted["rows"] if r[2] == "train"]
    manifest = write_manifest(root / "grow.csv", rows)
    out = tmp_path / "grow.h5"
    first = extract(manifest, out, **kwargs)
    assert first.extracted == len(rows)
    assert extract(manifest, out, **kwargs).up_to_date
    make_image(1, 77).save(root / "new.jpg", quality=90)
    with open(manifest, "a", newline="") as f:
        csv.writer(f).writerow(["new.jpg", "dog", "train"])
    before = Cache(out)
    old_codes = before.features("train")[()]
    before.close()
    again = extract(manifest, out, **kwargs)
    assert again.extracted == 1 and not again.up_to_date
    with Cache(out) as c:
        assert list(c.paths("train")) == [r[0] for r in rows] + ["new.jpg"]
        np.testing.assert_array_equal(c.features("train")[: len(rows)], old_codes)  # copied, not recomputed
        assert c.labels("train")[-1] == 1
        assert c.manifest["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    relabelled = manifest.read_text().replace("new.jpg,dog", "new.jpg,cat")
    manifest.write_text(relabelled)
    with Cache(out) as c:
        new_code = c.features("train")[-1]
    third = extract(manifest, out, **kwargs)
    # a new label changes its shard's rows: that shard (here new.jpg's folder, itself alone) is redone
    assert third.extracted == 1 and third.shards["redone"] == {"changed": 1} and not third.up_to_date
    with Cache(out) as c:
        assert c.labels("train")[-1] == 0
        np.testing.assert_array_equal(c.features("train")[-1], new_code)  # the same batches: the same code


BAD = {
    "no path column": (("file", "label"), [["a.jpg", "cat"]], "line 1: no 'path' column"),
    "no label column": (("path", "class"), [["a.jpg", "cat"]], "line 1: no 'label' column"),
    "unknown split": (("path", "label", "split"), [["a.jpg", "cat", "train"], ["b.jpg", "cat", "holdout"]],
                      "line 3: unknown split 'holdout'"),
    "empty label": (("path", "label"), [["a.jpg", "cat"], ["b.jpg", " "]], "line 3: empty 'label'"),
    "duplicate path": (("path", "label"), [["a.jpg", "cat"], ["b.jpg", "dog"], ["./a.jpg", "dog"]],
                       "line 4: ./a.jpg is listed again (first at line 2)"),
    "val label not in train": (("path", "label", "split"), [["a.jpg", "cat", "train"], ["b.jpg", "dog", "val"]],
                               "line 3: label 'dog' (val) has no train rows"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_manifests_are_one_line_errors_with_the_line(case, tmp_path, cli):
    header, rows, message = BAD[case]
    for name in ("a.jpg", "b.jpg"):
        make_image(0, 0).save(tmp_path / name)
    manifest = write_manifest(tmp_path / "m.csv", rows, header)
    r = cli("extract", manifest, "-o", tmp_path / "c.h5", *FAST, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert f"{manifest} {message}" in r.stderr
    assert not (tmp_path / "c.h5").exists()


def test_a_missing_file_is_skipped_and_reported_and_fatal_with_strict(tmp_path, cli):
    data = write_folder(tmp_path / "data", {"": 2})
    rows = [[f"data/{c}/{i:03d}.jpg", c] for c in ("cat", "dog") for i in range(2)]
    manifest = write_manifest(tmp_path / "m.csv", rows[:2] + [["data/cat/missing.jpg", "cat"]] + rows[2:],
                              header=("path", "label"))
    strict = cli("extract", manifest, "-o", tmp_path / "s.h5", *FAST, "--strict", check=False)
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert "data/cat/missing.jpg: No such file or directory (m.csv line 4) (--strict" in strict.stderr
    r = cli("extract", manifest, "-o", tmp_path / "c.h5", *FAST)
    assert "skipped data/cat/missing.jpg: No such file or directory (m.csv line 4)" in r.stderr
    with Cache(tmp_path / "c.h5") as c:
        assert len(c.paths("train")) == 4 and [p for p, _ in c.skipped("train")] == ["data/cat/missing.jpg"]
    assert data.exists()


def test_val_fraction_is_seeded_stratified_and_recorded(tmp_path, cli):
    rows = [[f"{c}{i}.jpg", c] for c, n in (("a", 10), ("b", 20), ("c", 5)) for i in range(n)]
    manifest = write_manifest(tmp_path / "m.csv", rows, header=("path", "label"))

    def split(seed):
        m = read_manifest(manifest, ManifestOptions(val_fraction=0.2, seed=seed))
        return {r.path for r in m.rows if r.split == "val"}, m

    val, m = split(0)
    assert val == split(0)[0] != split(1)[0]  # reproducible, and the seed matters
    per_label = {c: sum(r.split == "val" for r in m.rows if r.label == c) for c in "abc"}
    assert per_label == {"a": 2, "b": 4, "c": 1}  # round(0.2 n) of every label
    assert m.record["splits_from"] == "val_fraction" and m.record["val_fraction"] == 0.2 and m.record["seed"] == 0
    shuffled = write_manifest(tmp_path / "s.csv", rows[::-1], header=("path", "label"))
    assert {r.path for r in read_manifest(shuffled, ManifestOptions(val_fraction=0.2)).rows if r.split == "val"} == val
    grown = write_manifest(tmp_path / "g.csv", rows + [["a10.jpg", "a"]], header=("path", "label"))
    moved = {r.path for r in read_manifest(grown, ManifestOptions(val_fraction=0.2)).rows if r.split == "val"} ^ val
    assert len(moved - {"a10.jpg"}) <= 1  # an appended row moves at most one old row
    with pytest.raises(CnnCodesError, match="has a 'split' column and --val-fraction"):
        read_manifest(write_manifest(tmp_path / "x.csv", [["a.jpg", "a", "train"]]), ManifestOptions(val_fraction=0.2))
    folder = write_folder(tmp_path / "data", {"": 1})
    r = cli("extract", folder, "-o", tmp_path / "c.h5", *FAST, "--val-fraction", "0.2", check=False)
    assert r.returncode == 2 and "--val-fraction applies to CSV manifests" in r.stderr


def test_val_fraction_from_the_cli_makes_a_val_split_in_the_cache(tmp_path, cli):
    write_folder(tmp_path / "data", {"": 5})
    rows = [[f"data/{c}/{i:03d}.jpg", c] for c in ("cat", "dog") for i in range(5)]
    manifest = write_manifest(tmp_path / "m.csv", rows, header=("path", "label"))
    cli("extract", manifest, "-o", tmp_path / "c.h5", *FAST, "--val-fraction", "0.4", "--seed", "3")
    expected = read_manifest(manifest, ManifestOptions(val_fraction=0.4, seed=3))
    with Cache(tmp_path / "c.h5") as c:
        assert list(c.paths("val")) == [r.path for r in expected.rows if r.split == "val"]
        assert sorted(c.labels("val").tolist()) == [0, 0, 1, 1]
        assert c.manifest["val_fraction"] == 0.4 and c.manifest["seed"] == 3
    info = cli("info", tmp_path / "c.h5").stdout
    assert "splits from val_fraction 0.4 (seed 3)" in info


def test_discover_reads_a_manifest_as_a_layout(tmp_path):
    """What finetune (and every other discover caller) gets for a .csv: the folder-shaped layout."""
    write_folder(tmp_path / "imgs", {"": 2}, classes=("zebra", "ant"))
    rows = [[f"imgs/{c}/{i:03d}.jpg", c, s] for c in ("zebra", "ant") for i, s in ((0, "train"), (1, "test"))]
    layout = discover(write_manifest(tmp_path / "m.csv", rows))
    assert layout.classes == ["ant", "zebra"] and layout.root == tmp_path
    assert [(f.path, f.label) for f in layout.splits["test"]] == [("imgs/zebra/001.jpg", 1), ("imgs/ant/001.jpg", 0)]
    assert layout.manifest["splits_from"] == "column"


def test_finetune_reads_a_manifest_through_discover(tmp_path):
    """finetune's own discover call gets manifests (its CLI options are wired separately)."""
    from cnncodes.finetune import finetune

    write_folder(tmp_path / "imgs", {"": 3}, size=32)
    rows = [[f"imgs/{c}/{i:03d}.jpg", c, "val" if i == 2 else "train"] for c in ("cat", "dog") for i in range(3)]
    result = finetune(write_manifest(tmp_path / "m.csv", rows), tmp_path / "run", arch="resnet18", weights="none",
                      epochs=1, batch_size=4, image_size=32, workers=0, device="cpu", progress=False,
                      echo=lambda _: None)
    assert result.classes == ["cat", "dog"] and result.has_val and result.model_path.exists()
    assert result.history[-1]["epoch"] == 1


def test_finetune_cli_takes_manifest_columns_and_val_fraction(tmp_path, cli):
    """`cnncodes finetune m.csv --path-col --label-col --val-fraction`: the run trains on the
    manifest's train rows, evaluates on the drawn val rows, and its model predicts the manifest."""
    write_folder(tmp_path / "imgs", {"": 5}, size=32)
    rows = [[f"imgs/{c}/{i:03d}.jpg", c] for c in ("cat", "dog") for i in range(5)]
    manifest = write_manifest(tmp_path / "m.csv", rows, header=("file", "kind"))
    out = cli("finetune", manifest, "-o", tmp_path / "run", "--path-col", "file", "--label-col", "kind",
              "--val-fraction", "0.4", "--arch", "resnet18", "--weights", "none", "--epochs", "1",
              "--batch-size", "4", "--image-size", "32", "--workers", "0", "--device", "cpu", "-q")
    assert "Traceback" not in out.stderr
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert (log["train_images"], log["val_images"]) == (6, 4)  # round(0.4 x 5) = 2 val rows per label
    assert log["epochs"][-1]["val_images"] == 4 and log["epochs"][-1]["val_acc"] is not None
    preds = cli("predict", tmp_path / "run", manifest, "--path-col", "file", "--label-col", "kind",
                "-o", tmp_path / "p.csv")
    assert "accuracy" in preds.stdout
    with open(tmp_path / "p.csv") as f:
        assert sorted(r["path"] for r in csv.DictReader(f)) == sorted(r[0] for r in rows)


def test_finetune_cli_refuses_val_fraction_on_a_folder(tmp_path, cli):
    write_folder(tmp_path / "data", {"train": 2}, size=32)
    out = cli("finetune", tmp_path / "data", "-o", tmp_path / "run", "--val-fraction", "0.2", "--weights", "none",
              check=False)
    assert out.returncode == 2 and "--val-fraction applies to CSV manifests" in out.stderr
    assert "Traceback" not in out.stderr
