"""Choosing among caches (fit-head with several caches, --clf a,b, --concat) and `cnncodes select`."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from cnncodes.errors import CnnCodesError
from cnncodes.heads import LinearHead
from cnncodes.heads.config import HeadConfig
from cnncodes.heads.multi import fit_head_multi
from cnncodes.testing import write_synthetic_cache

IMAGES = {"train": 90, "val": 45}


def relabel(path: Path, arch: str) -> Path:
    """Give a synthetic cache another backbone in its config (they all say resnet18): another candidate."""
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["config"])
        config["arch"] = arch
        f.attrs["config"] = json.dumps(config)
        f.attrs["arch"] = arch
    return path


def informative(tmp_path: Path, name: str = "good", arch: str = "resnet18", **kw) -> Path:
    kw = {"images": IMAGES, "dim": 48, "n_classes": 3, "separation": 4.0, **kw}
    return relabel(write_synthetic_cache(tmp_path / f"{name}.h5", **kw), arch)


def noise(tmp_path: Path, name: str = "noise", arch: str = "mobilenet_v2", seed: int = 5, **kw) -> Path:
    """The same images, labels and splits as `informative`, codes that carry no class information."""
    path = informative(tmp_path, name, arch, **kw)
    rng = np.random.default_rng(seed)
    with h5py.File(path, "r+") as f:
        for split in f:
            ds = f[split]["features"]
            ds[...] = rng.normal(size=ds.shape).astype(np.float32)
    return path


def corrupt_val(path: Path, nan: bool = False) -> None:
    with h5py.File(path, "r+") as f:
        ds = f["val"]["features"]
        ds[...] = np.nan if nan else np.random.default_rng(1).normal(0, 100, size=ds.shape).astype(np.float32)


def cv_table(report: dict) -> list[tuple]:
    return [(c["name"], c["clf"], c["C"], c["cv_score"]) for c in report["candidates"]]


def test_strictly_better_candidate_is_chosen_whatever_the_order(tmp_path):
    good, bad = informative(tmp_path), noise(tmp_path)
    for order in ([good, bad], [bad, good]):
        head, report = fit_head_multi(order, ["logreg"])
        assert report["chosen"] == "good logreg"
        scores = {c["name"]: c["cv_score"] for c in report["candidates"]}
        assert scores["good"] > scores["noise"] + 0.2
        assert report["splits"]["val"]["accuracy"] > 0.8
        assert head.meta["arch"] == "resnet18" and head.n_features == 48
        assert list(report["splits"]) == ["val"] and "optimistic" not in report


def test_val_codes_are_never_read_before_the_choice(tmp_path):
    good, bad = informative(tmp_path), noise(tmp_path)
    _, before = fit_head_multi([good, bad], ["logreg", "svm"])
    corrupt_val(good)  # the chosen cache's val codes: the choice and every CV score stay the same
    corrupt_val(bad, nan=True)  # an unchosen cache's val codes are never read at all (NaN would raise)
    _, after = fit_head_multi([good, bad], ["logreg", "svm"])
    assert after["chosen"] == before["chosen"] and cv_table(after) == cv_table(before)
    assert after["splits"]["val"]["accuracy"] < before["splits"]["val"]["accuracy"]  # val was read: after the choice
    with pytest.raises(CnnCodesError, match="NaN"):  # ... and --show-all-val reads the others' only then
        fit_head_multi([good, bad], ["logreg"], show_all_val=True)


def test_every_candidate_is_scored_on_the_same_folds(tmp_path, monkeypatch):
    """Per image, one fold for every candidate, even when a cache stores extra views (other rows)."""
    import cnncodes.heads.selection as selection

    good, bad = informative(tmp_path), noise(tmp_path, views=2)
    seen = []
    real = selection.fit_linear

    def spy(data, config, device="cpu", folds=None, refit=True):
        if folds is not None:
            first = np.r_[True, data.groups[1:] != data.groups[:-1]]  # one row per image, in image order
            seen.append((config.clf, data.features.shape, folds[0][first], folds[1]))
        return real(data, config, device, folds=folds, refit=refit)

    monkeypatch.setattr(selection, "fit_linear", spy)
    fit_head_multi([good, bad], ["logreg", "svm"], config=HeadConfig(folds=4))
    assert len(seen) == 4 and {s[1][0] for s in seen} == {90, 270}  # the noise cache has 3 rows per image
    for _, _, per_image, k in seen:
        assert k == 4 and np.array_equal(per_image, seen[0][2])
    assert np.bincount(seen[0][2]).tolist() == [23, 23, 22, 22]  # stratified, grouped, dealt once


def test_fusion_with_noise_is_about_the_single_best(tmp_path):
    good, bad = informative(tmp_path), noise(tmp_path)
    _, report = fit_head_multi([good, bad], ["logreg"], concat=True)
    scores = {c["name"]: c["cv_score"] for c in report["candidates"]}
    fused = scores["concat(good+noise)"]
    se = np.sqrt(scores["good"] * (1 - scores["good"]) / IMAGES["train"])  # binomial CV noise on 90 images
    assert abs(fused - scores["good"]) <= 3 * se + 1e-9
    assert [c["code_dim"] for c in report["candidates"]] == [48, 48, 96]


def test_fusion_of_two_noisy_views_wins_and_its_head_is_refused_by_predict(tmp_path, cli):
    """Two caches that each see the class signal through independent noise: their concatenation is
    better, is chosen, and is an ordinary head file that predict/export refuse in one line."""
    a, b = informative(tmp_path, "a"), informative(tmp_path, "b", "mobilenet_v2")
    rng = np.random.default_rng(3)
    for path in (a, b):  # class means 0.3 x N(0, 1) per dimension, unit noise: ~0.75 accuracy alone
        centers = rng.normal(0, 0.3, size=(3, 48))
        with h5py.File(path, "r+") as f:
            for split in f:
                y = f[split]["labels"][()]
                f[split]["features"][...] = (centers[y] + rng.normal(size=(len(y), 48))).astype(np.float32)
    out = tmp_path / "fused.h5"
    r = cli("fit-head", a, b, "--concat", "-o", out, "--json", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["chosen"] == "concat(a+b) logreg", r.stdout
    head = LinearHead.load(out)
    assert head.n_features == 96 and [m["arch"] for m in head.meta["fused"]] == ["resnet18", "mobilenet_v2"]
    for args in (("predict", out, a), ("export", out, "-o", tmp_path / "x.pt")):
        r = cli(*args, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "fusion of 2 backbones" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


def test_cli_table_and_show_all_val(tmp_path, cli):
    good, bad = informative(tmp_path), noise(tmp_path)
    r = cli("fit-head", good, bad, "--clf", "logreg,svm", "-o", tmp_path / "h.h5", "--show-all-val",
            "--json", tmp_path / "r.json")
    lines = r.stdout.splitlines()
    report = json.loads((tmp_path / "r.json").read_text())
    best = max(report["candidates"], key=lambda c: c["cv_score"])
    assert report["chosen"] == f"good {best['clf']}" and best["chosen"]
    assert [line for line in lines if "<- chosen" in line][0].startswith(report["chosen"])
    assert sum("OPTIMISTIC" in line for line in lines) == 4  # the note, then the 3 candidates not chosen
    others = {f"{c['name']} {c['clf']}" for c in report["candidates"]} - {report["chosen"]}
    assert set(report["optimistic"]["candidates"]) == others
    assert all(c["fit_seconds"] >= 0 and c["code_dim"] == 48 for c in report["candidates"])


def _bad_pairs(tmp_path: Path) -> dict[str, tuple[list[Path], str]]:
    good = informative(tmp_path)
    other_images = informative(tmp_path, "fewer", "mobilenet_v2", images={"train": 87, "val": 45})
    other_classes = informative(tmp_path, "classes", "mobilenet_v2", n_classes=4)
    other_splits = informative(tmp_path, "splits", "mobilenet_v2", images={**IMAGES, "test": 12})
    no_train = informative(tmp_path, "notrain", "mobilenet_v2", images={"val": 45})
    relabelled = informative(tmp_path, "labels", "mobilenet_v2")
    with h5py.File(relabelled, "r+") as f:
        y = f["val"]["labels"][()]
        f["val"]["labels"][...] = (y + 1) % 3
    same = informative(tmp_path, "copy")
    return {
        "images": ([good, other_images], "first difference"),
        "classes": ([good, other_classes], "4 classes"),
        "splits": ([good, other_splits], "splits test, train, val"),
        "labels": ([good, relabelled], "is labelled"),
        "no train": ([good, no_train], "no 'train' split"),
        "same file": ([good, good], "the same file"),
        "same codes": ([good, same], "hold the same codes"),
    }


def test_bad_caches_are_one_line_and_write_nothing(tmp_path, cli):
    for what, (caches, message) in _bad_pairs(tmp_path).items():
        out = tmp_path / f"head-{what}.h5"
        r = cli("fit-head", *caches, "-o", out, "--json", tmp_path / f"{what}.json", check=False)
        assert r.returncode == 2, (what, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (what, r.stderr)
        assert message in r.stderr, (what, r.stderr)
        assert not out.exists() and not (tmp_path / f"{what}.json").exists()


def test_bad_options_are_one_line(tmp_path, cli):
    good, bad = informative(tmp_path), noise(tmp_path)
    for args, message in [(("--clf", "logreg,sv"), "unknown --clf 'sv'"), (("--clf", "svm,svm"), "named twice")]:
        r = cli("fit-head", good, bad, "-o", tmp_path / "h.h5", *args, check=False)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli("fit-head", good, "--concat", "-o", tmp_path / "h.h5", check=False)
    assert r.returncode == 2 and "two or more caches" in r.stderr
    assert not (tmp_path / "h.h5").exists()


def test_one_cache_several_heads_and_fixed_C(tmp_path):
    good = informative(tmp_path)
    head, report = fit_head_multi([good], ["logreg", "svm"], config=HeadConfig(C=0.1))
    assert {c["clf"] for c in report["candidates"]} == {"logreg", "svm"}
    assert all(c["grid"] == [0.1] and c["cv_score"] > 0.7 for c in report["candidates"])  # still scored by CV
    assert head.C == 0.1 and head.clf == report["clf"]


# --------------------------------------------------------------------------- cnncodes select


@pytest.mark.parametrize("spec, message", [
    ("resnet18=none", "one backbone"),
    ("resnet18=none,,mobilenet_v2", "empty backbone"),
    ("resnet18=,mobilenet_v2", "cannot parse"),
    ("resnet18=none@,mobilenet_v2", "cannot parse"),
    ("resnet18=none,not_a_net=none", "not_a_net"),
    ("resnet18=none,mobilenet_v2=/nowhere/w.pth", "weights file not found"),
    ("resnet18=none,resnet18=none", "same backbone"),
])
def test_select_bad_spec_is_one_line_and_writes_nothing(tmp_path, cli, spec, message):
    out = tmp_path / "sel"
    r = cli("select", tmp_path, "--arch", spec, "-o", out, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_select_extracts_each_backbone_chooses_and_resumes(tmp_path, cli):
    from conftest import write_folder

    data = write_folder(tmp_path / "data", {"train": 6, "val": 2}, classes=("a", "b", "c"), size=32)
    out = tmp_path / "sel"
    args = ("select", data, "--arch", "resnet18=none,mobilenet_v2=none", "--image-size", "32", "-o", out, "-q")
    r = cli(*args)
    report = json.loads((out / "report.json").read_text())
    assert [b["name"] for b in report["backbones"]] == ["resnet18", "mobilenet_v2"]
    assert all(b["extracted"] == 24 and b["extract_seconds"] > 0 for b in report["backbones"])
    assert report["chosen"] in {f"{n} logreg" for n in ("resnet18", "mobilenet_v2")}
    assert LinearHead.load(out / "head.h5").meta["arch"] == report["chosen"].split()[0]
    assert "<- chosen" in r.stdout and "extraction" in r.stdout
    again = json.loads((cli(*args), (out / "report.json").read_text())[1])
    assert all(b["up_to_date"] and b["extracted"] == 0 for b in again["backbones"])  # finished caches are kept
    assert cv_table(again) == cv_table(report)


# --------------------------------------------------------------------------- heads fast enough to choose among many


def test_svm_solves_linearsvc_objective_by_lbfgs(tmp_path):
    """svm runs L-BFGS on LinearSVC's objective at every size (said in the notes): the CV scores of liblinear's
    LinearSVC on the same folds within CV noise, and a head that predicts like LinearSVC fitted on all of train."""
    from sklearn.svm import LinearSVC

    from cnncodes.heads import fit_head
    from cnncodes.heads.codes import load_train
    from cnncodes.heads.selection import cv_folds
    from cnncodes.store import Cache

    cache = informative(tmp_path, images={"train": 300, "val": 90}, dim=16, separation=1.0)
    grid = (1e-4, 1e-2, 1.0)
    head, report = fit_head(cache, "svm", grid=grid, patience=None)
    assert any("LinearSVC's objective" in n for n in report["selection"]["notes"])
    with Cache(cache) as c:
        data, x_val = load_train(c), c.features("val")[()]
    fold, k, _ = cv_folds(data, 5, 0)
    x, y = data.features, data.y
    reference = [np.mean([(LinearSVC(C=C, tol=1e-8, max_iter=100_000).fit(x[fold != f], y[fold != f])
                           .predict(x[fold == f]) == y[fold == f]).mean() for f in range(k)]) for C in grid]
    np.testing.assert_allclose(report["selection"]["cv_scores"], reference, atol=3 / 300)
    sk = LinearSVC(C=head.C, tol=1e-8, max_iter=100_000).fit(x, y)
    assert (head.predict(x_val) == sk.predict((x_val - data.mean) / data.scale)).mean() > 0.97
