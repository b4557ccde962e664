"""audit: label issues from out-of-fold probabilities, exact/near duplicates and leaks, outliers, the exact and
faiss neighbour searches, bad inputs, pictures from real files (folder, manifest), and fit-head --exclude."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_folder
from PIL import Image

from cnncodes.audit import audit, neighbours
from cnncodes.audit.config import AuditConfig
from cnncodes.audit.images import Images, load_images
from cnncodes.audit.labels import out_of_fold_scores, temperature_scale
from cnncodes.heads.format import softmax
from cnncodes.audit.neighbours import exact_neighbours, faiss_neighbours, find_neighbours
from cnncodes.errors import CnnCodesError
from cnncodes.extract import extract
from cnncodes.heads import fit_head
from cnncodes.heads.codes import load_train
from cnncodes.heads.config import HeadConfig
from cnncodes.store import Cache
from cnncodes.testing import write_synthetic_cache

FAST = dict(arch="resnet18", weights="none", image_size=64, workers=0, progress=False, log=lambda m: None)
FLIPPED = (3, 17, 42, 55)  # train images whose label the tests flip


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def edit(src: Path, dst: Path, change) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        change(f)
    return dst


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """2 classes, 60 train images x 2 views, 20 val images, 32-d, well separated."""
    path = tmp_path_factory.mktemp("audit") / "syn.h5"
    return write_synthetic_cache(path, {"train": 60, "val": 20}, dim=32, n_classes=2, views=1, separation=8.0, seed=3)


@pytest.fixture(scope="module")
def flipped(synthetic, tmp_path_factory) -> Path:
    """The synthetic cache with FLIPPED's labels swapped (all their views)."""
    def flip(f):
        labels, paths = f["train/labels"][()], f["train/paths"].asstr()[()]
        names = sorted(set(paths), key=list(paths).index)
        for i in FLIPPED:
            rows = paths == names[i]
            labels[rows] = 1 - labels[rows]
        f["train/labels"][...] = labels

    return edit(synthetic, tmp_path_factory.mktemp("flip") / "flipped.h5", flip)


def train_paths(cache: Path) -> np.ndarray:
    with Cache(cache) as c:
        return c.paths("train")[c.views("train") == 0]


# --------------------------------------------------------------------------- label issues


def test_flipped_labels_are_found_first(flipped, tmp_path):
    summary = audit(flipped, tmp_path / "a", device="cpu")
    rows = read_csv(tmp_path / "a" / "label_issues.csv")
    flips = set(train_paths(flipped)[list(FLIPPED)])
    assert {r["path"] for r in rows[:len(FLIPPED)]} == flips  # every flip, ahead of anything else
    assert all(r["split"] == "train" and r["given"] != r["suggested"] for r in rows)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores)  # most suspicious (lowest probability of the given label) first
    head = summary["head"]
    assert summary["label_issues"]["count"] == len(rows) and head["clf"] == "logreg" and head["C_auto"]
    _, report = fit_head(flipped, device="cpu")
    assert head["C"] == report["C"]  # the C fit-head chooses


def test_out_of_fold_probabilities_come_from_models_without_the_image(flipped):
    """Each fold's images are scored by LogisticRegression fitted at the same C on the other folds only."""
    from sklearn.linear_model import LogisticRegression

    from cnncodes.heads.selection import grouped_folds

    with Cache(flipped) as c:
        data = load_train(c, in_memory=True)
    config = HeadConfig(C=0.1, folds=4, seed=2)
    scores, first, k = out_of_fold_scores(data, config, "cpu")
    probs = softmax(scores)
    assert k == 4 and probs.shape == (60, 2) and np.allclose(probs.sum(1), 1)
    fold = grouped_folds(data.y, data.groups, 4, 2)
    assert all(len(set(fold[data.groups == g])) == 1 for g in np.unique(data.groups))  # views of an image: one fold
    for f in range(4):  # to the solver's tolerance (the heads' L-BFGS stops near, not at, scikit-learn's optimum)
        held = first[fold[first] == f]
        model = LogisticRegression(C=0.1, max_iter=5000, tol=1e-10).fit(data.features[fold != f], data.y[fold != f])
        assert np.allclose(probs[np.isin(first, held)], model.predict_proba(data.features[held]), atol=0.02)
    in_sample = LogisticRegression(C=0.1, max_iter=5000).fit(data.features, data.y).predict_proba(data.features[first])
    assert np.abs(probs - in_sample).max() > 0.1  # the flipped images: a model that saw them is far more forgiving


def test_tta_averages_the_views(flipped):
    with Cache(flipped) as c:
        data = load_train(c, in_memory=True)
    plain, _, _ = out_of_fold_scores(data, HeadConfig(C=0.1), "cpu")
    tta, first, _ = out_of_fold_scores(data, HeadConfig(C=0.1, tta=True), "cpu")
    assert not np.allclose(plain, tta) and plain.shape == tta.shape == (60, 2)


def test_temperature_undoes_the_scale_of_squashed_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(3, size=200)
    logits = 3.0 * np.eye(3)[labels] + rng.normal(size=(200, 3))
    beta = temperature_scale(logits / 1000, labels)  # a strongly regularised head's scores: near-uniform
    assert np.isclose(beta, 1000 * temperature_scale(logits, labels), rtol=1e-3)  # the scale is undone
    assert -np.log(softmax(beta * logits / 1000)[np.arange(200), labels]).mean() < 0.9 * np.log(3)
    assert np.array_equal(softmax(beta * logits / 1000).argmax(1), logits.argmax(1))  # predictions unchanged
    two = logits[:, :2] / 1000
    p = softmax(temperature_scale(two, labels % 2) * two)[np.arange(200), labels % 2]
    assert np.array_equal(np.argsort(p), np.argsort(softmax(two)[np.arange(200), labels % 2]))  # 2 classes: the order too


# --------------------------------------------------------------------------- duplicates, leaks, outliers


@pytest.fixture(scope="module")
def planted(synthetic, tmp_path_factory) -> Path:
    """val image 2 := a copy of train image 5's code (a leak), val image 7 near train image 9 (noise), train
    image 30 := train image 31 (a duplicate inside train), train image 40 unlike any other (an outlier)."""
    def plant(f):
        t, v = f["train/features"][()], f["val/features"][()]
        tv, vv = f["train/views"][()], f["val/views"][()]
        tr, va = np.flatnonzero(tv == 0), np.flatnonzero(vv == 0)
        rng = np.random.default_rng(0)
        v[va[2]] = t[tr[5]]
        v[va[7]] = t[tr[9]] + 0.02 * rng.normal(size=t.shape[1])
        t[tr[30]] = t[tr[31]]
        t[tr[40]] = 0.0
        t[tr[40], :2] = 5.0  # active where others are not: like a blank placeholder picture's code
        f["train/features"][...], f["val/features"][...] = t, v

    return edit(synthetic, tmp_path_factory.mktemp("planted") / "planted.h5", plant)


def test_duplicates_leaks_first_and_outliers(planted, tmp_path):
    summary = audit(planted, tmp_path / "a", device="cpu")
    paths = train_paths(planted)
    with Cache(planted) as c:
        val = c.paths("val")
    dups = read_csv(tmp_path / "a" / "duplicates.csv")
    pairs = [({r["path_a"], r["path_b"]}, r["split_a"], r["split_b"], r["kind"]) for r in dups]
    assert pairs[0][1:] == ("val", "train", "near") and pairs[1][1:] == ("val", "train", "near")  # leaks first
    assert {frozenset(p[0]) for p in pairs[:2]} == {frozenset({val[2], paths[5]}), frozenset({val[7], paths[9]})}
    assert float(dups[0]["similarity"]) >= float(dups[1]["similarity"])  # strongest first
    assert ({paths[30], paths[31]}, "train", "train", "near") in pairs  # no files: identical codes stay 'near'
    leaks = read_csv(tmp_path / "a" / "leaks.csv")
    assert [r["path"] for r in leaks] == [dups[0]["path_a"], dups[1]["path_a"]] and leaks[0]["split"] == "val"
    assert "not run" in summary["duplicates"]["exact_check"] and summary["pictures"] == []
    outliers = read_csv(tmp_path / "a" / "outliers.csv")
    assert outliers[0]["path"] == paths[40] and float(outliers[0]["z"]) > 5
    assert summary["outliers"]["count"] == len(outliers) and summary["leaks"]["images"] == 2


def test_near_threshold_is_overridable(planted, tmp_path):
    summary = audit(planted, tmp_path / "a", AuditConfig(near=1.0), device="cpu")
    assert summary["duplicates"]["near_threshold"] == 1.0
    assert summary["duplicates"]["pairs"] < audit(planted, tmp_path / "b", device="cpu")["duplicates"]["pairs"]


def random_images(n: int, d: int, seed: int = 0) -> Images:
    rng = np.random.default_rng(seed)
    raw = np.abs(rng.normal(size=(n, d))).astype(np.float32) ** 2
    mean = raw.mean(0)
    x = raw - mean
    length = np.linalg.norm(x, axis=1)
    return Images(np.zeros(n, object), np.full(n, "train", object), np.zeros(n, np.int64), x / np.maximum(length, 1e-12)[:, None],
                  length, mean, ["a"])


def test_exact_search_matches_brute_force_in_both_spaces(monkeypatch):
    images = random_images(300, 24)
    monkeypatch.setattr(neighbours, "SCORE_BYTES", 8 * 300 * 7)  # 7 queries per block: blocks and a ragged end
    (ci, cs), (ri, rs) = exact_neighbours(images, 5, "cpu")
    raw = images.raw_unit(slice(None))
    for z, idx, sim in ((images.codes, ci, cs), (raw, ri, rs)):
        s = z @ z.T
        np.fill_diagonal(s, -np.inf)
        assert np.array_equal(idx, np.argsort(-s, axis=1, kind="stable")[:, :5])
        assert np.allclose(sim, -np.sort(-s, axis=1)[:, :5], atol=1e-5)


def test_search_choice():
    images = random_images(50, 8)
    centred, raw = find_neighbours(images, 3, "exact", "cpu")
    assert centred.method.startswith("exact") and centred.index.shape == raw.index.shape == (50, 3)
    one = find_neighbours(random_images(1, 8), 3, "auto", "cpu")[0]
    assert one.index.shape == (1, 0)  # one image has no neighbour


def test_faiss_finds_the_planted_pairs():
    pytest.importorskip("faiss")
    images = random_images(3000, 256)
    rng = np.random.default_rng(1)
    first = rng.choice(1500, 40, replace=False)
    images.codes[1500 + first] = images.codes[first] + 0.1 * rng.normal(size=(40, 256)).astype(np.float32) / 16
    images.codes /= np.linalg.norm(images.codes, axis=1, keepdims=True)
    raw = images.raw_unit(slice(None))
    for space, z in (("centred", images.codes), ("raw", raw)):
        idx, sim = faiss_neighbours(images, 5, raw=space == "raw")
        assert all(b in idx[a] for a, b in zip(first, 1500 + first)), space
        exact = np.einsum("nd,nkd->nk", z, z[np.maximum(idx, 0)])
        assert np.allclose(sim, exact, atol=1e-4), space  # rescored on the full codes
        assert (idx != np.arange(3000)[:, None]).all() and (np.diff(sim, axis=1) <= 1e-6).all()
    assert find_neighbours(images, 5, "faiss", "cpu")[0].method.startswith("faiss")


def test_faiss_missing_is_one_line(monkeypatch):
    monkeypatch.setattr(neighbours, "_has_faiss", lambda: False)
    with pytest.raises(CnnCodesError, match="pip install faiss-cpu"):
        find_neighbours(random_images(10, 4), 3, "faiss")
    monkeypatch.setattr(neighbours, "EXACT_UP_TO", 5)
    centred, _ = find_neighbours(random_images(10, 4), 3, "auto", "cpu")
    assert centred.method.startswith("exact") and "faiss is not installed" in centred.notes[0]


# --------------------------------------------------------------------------- bad input


def bad_caches(root: Path, good: Path) -> dict[str, tuple[Path, str]]:
    def nan_val(f):
        x = f["val/features"][()]
        x[3, 0] = np.nan
        f["val/features"][...] = x

    def nan_train(f):
        x = f["train/features"][()]
        x[7, 2] = np.inf
        f["train/features"][...] = x

    return {
        "no train": (write_synthetic_cache(root / "notrain.h5", {"val": 5}, dim=4, n_classes=2), "no 'train' split"),
        "one class": (write_synthetic_cache(root / "one.h5", {"train": 5, "val": 3}, dim=4, n_classes=1),
                      "only one class"),
        "NaN codes": (edit(good, root / "nan.h5", nan_val), "nan.h5: val: 1 of 20 codes hold NaN/inf"),
        "NaN train codes": (edit(good, root / "nant.h5", nan_train), "nant.h5: train: 1 of 120 codes hold NaN/inf"),
        "one image of a class": (write_synthetic_cache(root / "few.h5", {"train": 3}, dim=4, n_classes=2),
                                 "fewer than 2 train images"),
    }


def assert_one_line(proc, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert sum(line.startswith("error") for line in lines) == 1, proc.stderr


def test_bad_caches_are_one_line_and_write_nothing(cli, synthetic, tmp_path):
    for case, (cache, message) in bad_caches(tmp_path, synthetic).items():
        proc = cli("audit", cache, "-o", tmp_path / "out", check=False)
        assert_one_line(proc, message)
        assert not (tmp_path / "out").exists(), case
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


def test_existing_folder_is_refused_untouched(cli, synthetic, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = cli("audit", synthetic, "-o", tmp_path / "out", check=False)
    assert_one_line(proc, "exists; audit writes a new folder")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_bad_options_and_data(cli, synthetic, tmp_path):
    assert_one_line(cli("audit", synthetic, "-o", tmp_path / "o", "--near", "1.5", check=False), "--near must be in")
    assert_one_line(cli("audit", synthetic, "-o", tmp_path / "o", "--data", tmp_path, check=False),
                    "none of the cache's images")
    with pytest.raises(TypeError, match="unexpected keyword"):
        audit(synthetic, tmp_path / "o", nearr=0.5)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def image_audit(tmp_path_factory) -> dict:
    """Generated images with planted duplicates, extracted (random weights), audited from the CLI."""
    root = tmp_path_factory.mktemp("images")
    data = write_folder(root / "data", {"train": 8, "val": 3})
    shutil.copyfile(data / "val/cat/001.jpg", data / "train/cat/leak.jpg")  # same bytes across splits
    shutil.copyfile(data / "train/dog/002.jpg", data / "train/dog/copy.jpg")  # same bytes inside train
    Image.open(data / "train/cat/004.jpg").save(data / "train/cat/resaved.png")  # same pixels, other bytes
    extract(data, root / "c.h5", **FAST)
    return {"root": root, "data": data}


def test_cli_on_images_finds_exact_duplicates_and_draws(cli, image_audit):
    root, data = image_audit["root"], image_audit["data"]
    proc = cli("audit", root / "c.h5", "-o", root / "a", "--data", data, "--device", "cpu")
    out = proc.stdout.splitlines()
    assert out[0].startswith("leaks: 1 held-out image") and out[1].startswith("duplicates:")
    assert out[2].startswith("label issues:") and out[3].startswith("outliers:")
    rows = read_csv(root / "a" / "duplicates.csv")
    found = {(r["path_a"], r["path_b"], r["kind"]) for r in rows}
    assert (rows[0]["path_a"], rows[0]["path_b"], rows[0]["kind"]) == ("val/cat/001.jpg", "train/cat/leak.jpg", "exact")
    assert ("train/dog/002.jpg", "train/dog/copy.jpg", "exact") in found
    assert ("train/cat/004.jpg", "train/cat/resaved.png", "exact") in found  # by decoded pixels
    summary = json.loads((root / "a" / "summary.json").read_text())
    assert summary["format"] == "cnncodes-audit" and summary["duplicates"]["exact"] >= 3
    assert summary["images"] == {"train": 19, "val": 6} and "bytes (sha256) of 25 files" in summary["duplicates"]["exact_check"]
    assert "duplicates.png" in summary["pictures"] and (root / "a" / "duplicates.png").stat().st_size > 1000
    assert set(summary["seconds"]) >= {"label_issues", "neighbours", "duplicates", "pictures", "total"}


def test_manifest_cache_finds_its_files(image_audit, tmp_path):
    data = image_audit["data"]
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for p in sorted(data.rglob("*.*")):
            rel = p.relative_to(data)
            w.writerow([f"data/{rel.as_posix()}", rel.parts[1], rel.parts[0]])
    shutil.copytree(data, tmp_path / "data")
    extract(manifest, tmp_path / "m.h5", **FAST)
    summary = audit(tmp_path / "m.h5", tmp_path / "a", device="cpu")  # no --data: the manifest's folder
    assert summary["files"] == str(tmp_path) and summary["pictures"]
    assert summary["leaks"]["images"] == 1 and summary["duplicates"]["exact"] >= 3


# --------------------------------------------------------------------------- fit-head --exclude


def test_fit_head_exclude_leaves_out_train_images_and_scores_val_apart(synthetic, tmp_path, cli):
    paths = train_paths(synthetic)
    with Cache(synthetic) as c:
        val = c.paths("val")
        x, keep_rows = c.features("train")[()], ~np.isin(c.paths("train"), paths[:3])
    listed = tmp_path / "issues.csv"
    with open(listed, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "given"])
        w.writerows([[p, "train", "x"] for p in paths[:3]] + [[val[0], "val", "x"], [val[1], "val", "x"]])
    head, report = fit_head(synthetic, exclude=str(listed), device="cpu")
    assert report["train"] == {"images": 57, "codes": 114}  # all views of the 3 images left out
    assert report["excluded"]["train_images"] == 3
    assert np.allclose(head.mean, x[keep_rows].mean(0), atol=1e-5)  # standardised without them
    apart = report["excluded"]["splits"]["val"]
    assert apart["left_out"] == 2 and apart["images"] == 18 and report["splits"]["val"]["images"] == 20
    proc = cli("fit-head", synthetic, "-o", tmp_path / "h.h5", "--exclude", listed, "--device", "cpu")
    assert "val without the 2 image(s) --exclude lists: accuracy" in proc.stdout
    assert "left out 3 train image(s)" in proc.stderr
    assert_one_line(cli("fit-head", synthetic, "-o", tmp_path / "h2.h5", "--exclude", tmp_path / "none.csv",
                        check=False), "none.csv: cannot read it")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx,y\n")
    assert_one_line(cli("fit-head", synthetic, "-o", tmp_path / "h2.h5", "--exclude", bad, check=False),
                    "no 'path' column")
    assert not (tmp_path / "h2.h5").exists()


def test_fit_head_exclude_refuses_several_candidates(synthetic, tmp_path, cli):
    listed = tmp_path / "l.csv"
    listed.write_text("path\nx\n")
    proc = cli("fit-head", synthetic, "-o", tmp_path / "h.h5", "--clf", "logreg,svm", "--exclude", listed, check=False)
    assert_one_line(proc, "--exclude applies to one cache and one --clf")


def test_exclude_config_normalises():
    assert HeadConfig(exclude="a.csv").exclude == ("a.csv",)
    assert replace(HeadConfig(), exclude=["a", "b"]).exclude == ("a", "b")


def test_images_are_unit_and_centred_on_train(synthetic):
    with Cache(synthetic) as c:
        images = load_images(c)
        raw = c.features("train")[()][c.views("train") == 0]
    assert np.allclose(np.linalg.norm(images.codes, axis=1), 1, atol=1e-5)
    assert np.allclose(images.mean, raw.mean(0), atol=1e-4) and images.root is None
    assert np.allclose(images.raw_unit(slice(0, 60)), raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    assert list(images.splits[:60]) == ["train"] * 60 and list(images.splits[60:]) == ["val"] * 20


def test_without_cleanlab_is_one_line(cli, synthetic, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cleanlab(name, *args, **kwargs):
        if name.startswith("cleanlab"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cleanlab)
    assert_one_line(cli("audit", synthetic, "-o", tmp_path / "o", check=False), "pip install 'cnncodes[audit]'")
    assert not (tmp_path / "o").exists()


def test_sharded_store_is_audited_from_its_codes(image_audit, tmp_path):
    """A WebDataset store's index reads like any cache; its images live in tars, so codes only."""
    import io
    import tarfile

    from cnncodes.sources.webdataset import WebDatasetSource as ShardSource

    data = image_audit["data"]
    for split in ("train", "val"):
        files = sorted((data / split).rglob("*.jpg"))
        classes = sorted(p.name for p in (data / split).iterdir())
        with tarfile.open(tmp_path / f"{split}-000000.tar", "w") as t:
            for f in files:
                key = f.relative_to(data).with_suffix("").as_posix()
                for name, blob in ((f"{key}.jpg", f.read_bytes()), (f"{key}.cls", str(classes.index(f.parent.name)).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    t.addfile(info, io.BytesIO(blob))
    source = ShardSource({s: (str(tmp_path / f"{s}-000000.tar"),) for s in ("train", "val")})
    extract(source, tmp_path / "wds.h5", **FAST)
    summary = audit(tmp_path / "wds.h5", tmp_path / "a", device="cpu")
    assert summary["images"] == {"train": 18, "val": 6} and summary["files"] is None and summary["pictures"] == []
    leaks = read_csv(tmp_path / "a" / "leaks.csv")
    assert [(r["path"].split("/", 1)[1], r["train_path"].split("/", 1)[1]) for r in leaks] == [
        ("val/cat/001", "train/cat/leak")]  # identical bytes, identical code: found, as 'near' without the files
    assert leaks[0]["kind"] == "near" and float(leaks[0]["similarity"]) > 0.9999
