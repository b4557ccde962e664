"""fit-head: every --clf, grouped CV that never touches val, the HDF5 head format, bad inputs, sklearn API."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from cnncodes import heads
from cnncodes.errors import CnnCodesError
from cnncodes.heads import LinearHead, TorchLinearClassifier, codes, fit_head, selection
from cnncodes.store import Cache
from cnncodes.testing import write_synthetic_cache


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """3 classes, 40 train images x 3 views, 20 val images x 3 views, 16-d codes."""
    path = tmp_path_factory.mktemp("syn") / "syn.h5"
    return write_synthetic_cache(path, {"train": 40, "val": 20}, dim=16, n_classes=3, views=2, eval_views=2,
                                 separation=6.0, seed=1)


def copy_cache(src: Path, dst: Path, edit=None) -> Path:
    """A copy of a cache, optionally edited in place with `edit(h5py.File)`."""
    shutil.copy(src, dst)
    if edit:
        with h5py.File(dst, "r+") as f:
            edit(f)
    return dst


# --------------------------------------------------------------------------- fitting


@pytest.mark.parametrize("clf", heads.CLFS)
def test_each_clf_fits_reports_and_predicts(synthetic, clf):
    head, report = fit_head(synthetic, clf, "auto", device="cpu")
    val = report["splits"]["val"]
    assert head.coef.shape == (3, 16) and head.intercept.shape == (3,)
    assert head.C in heads.C_GRID and report["selection"]["cv_score"] > 0.8
    assert val["images"] == 20 and val["accuracy"] > 0.8
    assert sum(map(sum, val["confusion"]["matrix"])) == 20
    assert set(val["per_class"]) == {"class000", "class001", "class002"}
    with Cache(synthetic) as c:  # the report is per image on the plain view: recompute it from the head
        x, y, v = c.features("val")[()], c.labels("val"), c.views("val")
    assert np.isclose((head.predict(x[v == 0]) == y[v == 0]).mean(), val["accuracy"])


def test_fixed_C_and_tta(synthetic):
    head, report = fit_head(synthetic, "logreg", 0.1, tta=True)
    assert head.C == 0.1 and not report["selection"]["auto"]
    assert report["splits"]["val"]["views_per_image"] == 3  # plain view + 2 eval views averaged


def test_a_C_whose_fold_fits_did_not_converge_is_not_ranked_and_said(synthetic, monkeypatch):
    """CV never ranks a C whose fold models stopped short of the rule: the path stops there, the report says
    which C and why, the pick is among the converged C only; no ConvergenceWarning, warning filters untouched."""
    from sklearn.exceptions import ConvergenceWarning

    from cnncodes.heads import lbfgs

    monkeypatch.setattr(lbfgs, "LBFGS_MAX_ITER", 10)  # enough for the most regularised C, not for the largest
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        _, report = fit_head(synthetic, "logreg", "auto", patience=None)
        assert warnings.filters == before
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    sel = report["selection"]
    tried = len(sel["cv_scores"])
    assert 1 <= tried < len(heads.C_GRID)
    assert f"stopped at C={heads.C_GRID[tried]:g}: its fold fits did not converge, so it is not ranked" in sel["stopped_early"]
    assert any(f"did not converge at C={heads.C_GRID[tried]:g}" in n for n in sel["notes"])
    assert sel["C"] in heads.C_GRID[:tried]


def test_only_train_split_reports_cv(tmp_path):
    path = write_synthetic_cache(tmp_path / "t.h5", {"train": 30}, dim=8, n_classes=2)
    _, report = fit_head(path, "svm")
    assert report["splits"] == {} and "no held-out split" in report["note"]
    assert report["selection"]["cv_score"] is not None


def test_torch_head_matches_logreg_objective(synthetic):
    """The torch softmax head minimises the same objective as LogisticRegression(C)."""
    from sklearn.linear_model import LogisticRegression

    with Cache(synthetic) as c:
        x, y = c.load("train")
    x = (x - x.mean(0)) / x.std(0)

    def objective(model, C):  # mean cross-entropy + ||W||^2 / (2 C n): LogisticRegression's, divided by C n
        p = heads.softmax(x @ model.coef_.T + model.intercept_)
        return -np.log(p[np.arange(len(y)), y]).mean() + (model.coef_ ** 2).sum() / (2 * C * len(y))

    for C in (0.01, 0.3):
        sk = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(x, y)
        th = TorchLinearClassifier(C=C).fit(x, y)
        assert objective(th, C) < objective(sk, C) * 1.02 + 1e-3
        assert (th.predict(x) == sk.predict(x)).mean() > 0.97


# --------------------------------------------------------------------------- cross-validation


def test_cv_folds_never_split_the_views_of_an_image(synthetic, monkeypatch):
    with Cache(synthetic) as c:
        data = heads.load_train(c)
    for holdout_above in (10**9, 10):  # k-fold, then the held-out tenth used at scale
        monkeypatch.setattr(selection, "HOLDOUT_ABOVE", holdout_above)
        fold, n_folds, _ = heads.cv_folds(data, 5, seed=0)
        assert n_folds == (5 if holdout_above > 10 else 1)
        for g in np.unique(data.groups):
            assert len(np.unique(fold[data.groups == g])) == 1
        held = fold == 0
        assert set(np.unique(data.y[held])) == {0, 1, 2}  # stratified
        assert not set(data.groups[held]) & set(data.groups[~held])


def test_grouped_folds_are_stratified_by_image():
    groups = np.repeat(np.arange(103), 3)  # 103 images x 3 views
    y = np.repeat(np.arange(103) % 4, 3)
    fold = heads.grouped_folds(y, groups, 5, seed=3)
    assert all(len(np.unique(fold[groups == g])) == 1 for g in range(103))
    per_class = np.array([[((y == c) & (fold == f)).sum() // 3 for f in range(5)] for c in range(4)])
    assert (per_class.max(axis=1) - per_class.min(axis=1) <= 1).all()
    sizes = np.bincount(fold[::3])
    assert sizes.max() - sizes.min() <= 1


def test_auto_C_does_not_read_val_before_the_head_is_fitted(synthetic, monkeypatch):
    events: list[tuple[str, str]] = []
    for method in ("features", "load", "views", "groups", "paths"):
        original = getattr(Cache, method)

        def spy(self, split, _original=original, _method=method):
            events.append((_method, split))
            return _original(self, split)

        monkeypatch.setattr(Cache, method, spy)
    fit_head(synthetic, "linear", "auto", log=lambda m: events.append(("log", m)))
    fitted = next(i for i, e in enumerate(events) if e[0] == "log" and e[1].startswith("fitted"))
    assert all(split != "val" for _, split in events[:fitted])  # labels are the only val read before (class check)
    assert ("features", "val") in events[fitted:]


def test_auto_C_is_unchanged_when_val_codes_change(synthetic, tmp_path):
    def scramble(f):
        ds = f["val/features"]
        ds[...] = np.random.default_rng(0).normal(size=ds.shape).astype(np.float32)

    other = copy_cache(synthetic, tmp_path / "scrambled.h5", scramble)
    for clf in ("logreg", "linear"):
        a, ra = fit_head(synthetic, clf, max_iter=100)
        b, rb = fit_head(other, clf, max_iter=100)
        assert ra["selection"]["cv_scores"] == rb["selection"]["cv_scores"] and a.C == b.C
        np.testing.assert_array_equal(a.coef, b.coef)
        assert ra["splits"]["val"]["accuracy"] > rb["splits"]["val"]["accuracy"]


# --------------------------------------------------------------------------- the head file


def test_head_file_is_plain_hdf5_and_round_trips(synthetic, tmp_path):
    head, _ = fit_head(synthetic, "svm", 0.01)
    path = tmp_path / "head.h5"
    head.save(path)
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "cnncodes-head" and f.attrs["arch"] == "resnet18"
        kinds = {}
        f.visititems(lambda name, obj: kinds.__setitem__(name, obj))
        assert set(kinds) == {"coef", "intercept", "mean", "scale", "classes"}
        for name, ds in kinds.items():
            assert isinstance(ds, h5py.Dataset)
            assert ds.dtype.kind == "f" or h5py.check_string_dtype(ds.dtype) is not None, name
        for value in f.attrs.values():
            assert isinstance(value, (str, bytes, int, float, np.integer, np.floating)), value
    loaded = LinearHead.load(path)
    with Cache(synthetic) as c:
        x = c.features("val")[()]
    np.testing.assert_allclose(loaded.decision_function(x), head.decision_function(x), rtol=1e-5, atol=1e-5)
    assert loaded.classes == head.classes and loaded.clf == "svm" and loaded.C == 0.01
    assert loaded.meta["weights"] == "none:seed0" and loaded.meta["preprocessing"]["crop"] == 224


def test_folded_form_equals_standardise_then_linear(synthetic):
    head, _ = fit_head(synthetic, "logreg", 1.0)
    w, b = head.folded()
    x = np.random.default_rng(0).normal(size=(5, 16))
    np.testing.assert_allclose(x @ w.T + b, head.decision_function(x), rtol=1e-9, atol=1e-9)


def test_binary_models_become_two_symmetric_rows():
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).normal(size=(60, 4))
    y = (x[:, 0] > 0).astype(int)
    lr = LogisticRegression().fit(x, y)
    coef, icpt = heads.as_class_rows(lr.coef_, lr.intercept_)
    np.testing.assert_allclose(heads.softmax(x @ coef.T + icpt), lr.predict_proba(x), rtol=1e-9)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not an hdf5 file"), "not a readable HDF5 head file"),
    (lambda p: h5py.File(p, "w").close(), "not a cnncodes head"),
    (lambda p: write_synthetic_cache(p, {"train": 4}, dim=4, n_classes=2), "a cnncodes cache, not a head"),
])
def test_corrupt_or_foreign_head_files_are_refused(tmp_path, make, message):
    path = tmp_path / "head.h5"
    make(path)
    with pytest.raises(CnnCodesError, match=message):
        LinearHead.load(path)


def test_damaged_head_shapes_are_refused(synthetic, tmp_path):
    head, _ = fit_head(synthetic, "logreg", 1.0)
    head.save(tmp_path / "h.h5")
    with h5py.File(tmp_path / "h.h5", "r+") as f:
        del f["intercept"]
        f["intercept"] = np.zeros(7, np.float32)
    with pytest.raises(CnnCodesError, match=r"damaged head file \('intercept' has shape \(7,\)"):
        LinearHead.load(tmp_path / "h.h5")


# --------------------------------------------------------------------------- bad input through the CLI


def _bad_caches(root: Path, good: Path) -> dict[str, tuple[Path, str]]:
    def nan_rows(split):
        def edit(f):
            f[f"{split}/features"][[0, 3, 5]] = np.nan
        return edit

    def drop_class_from_train(f):
        labels = f["train/labels"][()]
        f["train/labels"][...] = np.where(labels == 2, 0, labels)

    return {
        "empty train": (write_synthetic_cache(root / "empty.h5", {"train": 0, "val": 3}, dim=4, n_classes=2),
                        "the train split has no codes"),
        "one class": (write_synthetic_cache(root / "one.h5", {"train": 5, "val": 3}, dim=4, n_classes=1),
                      "only one class ('class000')"),
        "no train": (write_synthetic_cache(root / "notrain.h5", {"val": 5}, dim=4, n_classes=2), "no 'train' split"),
        "nan train": (copy_cache(good, root / "nan.h5", nan_rows("train")), "train: 3 of 120 codes hold NaN/inf"),
        "nan val": (copy_cache(good, root / "nanval.h5", nan_rows("val")), "val: 2 of 20 codes hold NaN/inf"),
        "unseen val class": (copy_cache(good, root / "unseen.h5", drop_class_from_train),
                             "val has class(es) 'class002' (6 images) with no training codes"),
    }


def test_bad_caches_give_one_line_errors(cli, synthetic, tmp_path):
    for case, (cache, message) in _bad_caches(tmp_path, synthetic).items():
        proc = cli("fit-head", cache, "-o", tmp_path / "h.h5", "--clf", "logreg", check=False)
        assert proc.returncode == 2, (case, proc.stderr)
        assert message in proc.stderr, (case, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), (case, proc.stderr)
        assert sum(line.startswith("error") for line in lines) == 1, (case, proc.stderr)
        assert not (tmp_path / "h.h5").exists()


def test_in_memory_heads_refuse_codes_larger_than_memory(synthetic, monkeypatch):
    monkeypatch.setattr(codes, "available_memory", lambda: 1_000)
    with pytest.raises(CnnCodesError, match=r"--clf svm needs about .* GiB .* --clf linear-svm streams the codes"):
        fit_head(synthetic, "svm")
    with pytest.raises(CnnCodesError, match=r"--clf logreg needs about .* GiB .* --clf linear streams the codes"):
        fit_head(synthetic, "logreg")
    fit_head(synthetic, "linear", 1.0, max_iter=3)  # streams: no such limit


def test_memory_check_counts_the_lbfgs_working_memory(monkeypatch):
    """svm holds more than its codes: L-BFGS's curvature memory over the fold models' unknowns and score-sized
    tensors, which grow with the classes. 20k x 2048 codes are 164 MB; with 1000 classes the solver needs GBs."""
    monkeypatch.setattr(codes, "available_memory", lambda: 3 << 30)
    codes.check_memory("svm", (20_000, 2048), "c.h5", print, n_classes=10, folds=5)
    with pytest.raises(CnnCodesError, match=r"--clf svm needs about 1\d\.\d GiB"):
        codes.check_memory("svm", (20_000, 2048), "c.h5", print, n_classes=1000, folds=5)
    assert codes.lbfgs_bytes(100_000, 2048, 1000, 5) < 5 * codes.lbfgs_bytes(40_000, 2048, 1000, 5)  # held out: 1 model


def test_unseen_class_can_be_reported_as_errors(synthetic, tmp_path):
    cache, _ = _bad_caches(tmp_path, synthetic)["unseen val class"]
    head, report = fit_head(cache, "logreg", 1.0, allow_unseen_classes=True)
    val = report["splits"]["val"]
    assert head.classes == ["class000", "class001"] and val["unseen_classes"] == {"class002": 6}
    assert val["per_class"]["class002"]["recall"] == 0 and val["correct"] <= 14


def test_cli_fit_head_writes_head_json_and_confusion(cli, synthetic, tmp_path):
    proc = cli("fit-head", synthetic, "-o", tmp_path / "h.h5", "--clf", "svm", "--tta",
               "--json", tmp_path / "r.json", "--confusion", tmp_path / "c.png")
    assert "val: accuracy" in proc.stdout and "chosen by 5-fold" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tta"] and report["splits"]["val"]["views_per_image"] == 3
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert LinearHead.load(tmp_path / "h.h5").clf == "svm"


# --------------------------------------------------------------------------- scikit-learn conventions


def test_torch_head_in_pipeline_and_grid_search():
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), TorchLinearClassifier(lr=0.1, max_iter=100))
    search = GridSearchCV(pipe, {"torchlinearclassifier__C": [0.01, 1.0], "torchlinearclassifier__loss": ["softmax", "hinge"]},
                          cv=3).fit(x, y)
    best = search.best_estimator_[-1]
    assert search.best_score_ > 0.9 and best.coef_.shape == (3, 4) and best.intercept_.shape == (3,)
    assert list(best.classes_) == [0, 1, 2] and best.n_iter_ == 100


def _expected_failures(estimator) -> dict[str, str]:
    return {}  # every applicable check passes (two are skipped: no pandas, SCIPY_ARRAY_API unset)


try:
    from sklearn.utils.estimator_checks import parametrize_with_checks
except ImportError:  # pragma: no cover
    parametrize_with_checks = None


@parametrize_with_checks([TorchLinearClassifier(max_iter=10), TorchLinearClassifier(loss="hinge", max_iter=10)],
                         expected_failed_checks=_expected_failures)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# --------------------------------------------------------------------------- caches larger than memory


def test_image_groups_match_cache_groups(synthetic, tmp_path):
    with Cache(synthetic) as c:
        for split in c.splits:
            a, b = heads.image_groups(c, split, chunk=7), c.groups(split)
            assert len(np.unique(a)) == len(np.unique(b)) == len(np.unique(np.c_[a, b], axis=0))

    def shuffle_rows(f):
        f["train/views"][...] = f["train/views"][()][::-1]

    broken = copy_cache(synthetic, tmp_path / "b.h5", shuffle_rows)
    with Cache(broken) as c, pytest.raises(CnnCodesError, match="not grouped by image"):
        heads.image_groups(c, "train")


STREAM_FIT = r"""
import json, sys
from cnncodes import heads
from cnncodes.heads import codes

def status_mb(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024

codes.IN_MEMORY_BYTES = 0  # stream every train split from the cache, whatever its size
heads.fit_head(sys.argv[1], "linear", "auto", max_iter=3)  # warm-up (6k codes): lazy imports, BLAS and allocator pools
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status_mb("VmRSS")
head, report = heads.fit_head(sys.argv[2], "linear", "auto")
print(json.dumps({"grew_mb": status_mb("VmHWM") - base, "C": head.C, "cv": report["selection"],
                  "val": report["splits"]["val"]["accuracy"]}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_linear_head_streams_a_cache_several_times_its_memory_budget(tmp_path):
    """Peak RSS of the fit (auto C on a held-out tenth) stays far below the size of the codes."""
    import os
    import subprocess
    import sys

    budget_mb = 64
    small = write_synthetic_cache(tmp_path / "small.h5", {"train": 2_000, "val": 200}, dim=512, n_classes=4, views=2)
    big = write_synthetic_cache(tmp_path / "big.h5", {"train": 40_000, "val": 2_000}, dim=512, n_classes=4,
                                views=2, separation=5.0)
    codes_mb = 120_000 * 512 * 4 / 2**20
    assert codes_mb > 3 * budget_mb
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # freed blocks go back to the OS: RSS = live memory
    proc = subprocess.run([sys.executable, "-c", STREAM_FIT, str(small), str(big)], check=False, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["grew_mb"] < budget_mb, out
    assert out["cv"]["strategy"].startswith("held-out 1/10") and out["val"] > 0.9, out


# --------------------------------------------------------------------------- fast C search


def test_C_path_stops_early_and_says_why(synthetic):
    """svm/logreg walk C upwards; the early stop keeps the exhaustive search's scores and choice."""
    for clf in ("svm", "logreg"):
        full, rf = fit_head(synthetic, clf, patience=None)
        assert rf["selection"]["stopped_early"] is None and len(rf["selection"]["cv_scores"]) == len(heads.C_GRID)
        head, r = fit_head(synthetic, clf, patience=1)
        sel, scores = r["selection"], rf["selection"]["cv_scores"]
        tried = len(sel["cv_scores"])
        assert sel["cv_scores"] == scores[:tried]  # same folds, same fits: the same numbers
        stop = next(i for i in range(1, len(scores) + 1) if selection._stop_reason(heads.C_GRID, np.array(scores[:i]), 1)
                    or i == len(scores))
        assert tried == stop
        assert head.C == heads.C_GRID[int(np.argmax(scores[:tried]))]
        if tried < len(scores):
            assert sel["stopped_early"].startswith(f"stopped after C={heads.C_GRID[tried - 1]:g}")
            assert f"C={', '.join(f'{c:g}' for c in heads.C_GRID[tried:])} not fitted" in sel["stopped_early"]
        if max(scores[:tried]) == max(scores):  # the curve never beat the stop's best later on
            assert head.C == full.C


@pytest.mark.parametrize("scores, patience, stops_after", [
    ([0.5, 0.7, 0.9, 0.9, 0.9, 0.95, 0.95], 2, 5),  # plateau of 2 after the best: stop (0.95 is never seen)
    ([0.5, 0.7, 0.9, 0.9, 0.9, 0.95, 0.95], 3, 7),
    ([0.5, 0.7, 0.9, 0.8, 0.7, 0.6, 0.5], 2, 5),  # unimodal: stop right after two worse values
    ([0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95], 2, 7),  # rising: the whole grid
    ([0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95], None, 7),
])
def test_stop_rule(scores, patience, stops_after):
    grid = heads.C_GRID
    tried = next(i for i in range(1, 8) if selection._stop_reason(grid, np.array(scores[:i]), patience) or i == 7)
    assert tried == stops_after


def test_row_space_fit_equals_the_plain_fit():
    """Fewer codes than dimensions: fitting in the row space (QR) gives the plain fit's model (LogisticRegression;
    the L-BFGS path's row space is checked against scikit-learn by test_head_reference)."""
    from sklearn.linear_model import LogisticRegression

    from cnncodes.heads.rowspace import fold_codes

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = np.maximum(rng.normal(size=(60, 200)) + rng.normal(size=(3, 200))[y], 0)
    x = (x - x.mean(0)) / x.std(0)
    for C in (0.01, 1.0):
        models = []
        for rotate in (False, True):
            fc = fold_codes(x, y, rotate=rotate)
            assert (fc.basis is not None) == rotate and fc.x.shape[1] == (60 if rotate else 200)
            lr = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(fc.x, y)
            models.append((fc.to_codes(lr.coef_), lr.intercept_))
        (w0, b0), (w1, b1) = models
        tol = 2e-3  # float32 codes
        np.testing.assert_allclose(x @ w1.T + b1, x @ w0.T + b0, rtol=tol, atol=tol * np.abs(x @ w0.T).max())


# --------------------------------------------------------------------------- in-memory torch solver (L-BFGS)


@pytest.mark.parametrize("n", [150, 20])  # more rows than dimensions, and fewer (fitted in the row space: n < 0.75 D)
def test_lbfgs_path_reaches_logreg_optimum(n):
    """The in-memory L-BFGS solution of the softmax head is LogisticRegression(C)'s (multinomial) on the same codes."""
    from sklearn.linear_model import LogisticRegression

    from cnncodes.heads.lbfgs import lbfgs_path, prepare

    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 40)) + rng.normal(size=(3, 40))[y]
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    fold = np.arange(n) % 2
    grid = [0.01, 1.0]
    assert (prepare(x, y).space.basis is not None) == (n == 20)  # the row space is what n=20 tests
    path = lbfgs_path(x, y, 3, fold, np.array([0, -1]), grid, "softmax", max_iter=5000, rtol=1e-9)
    for C, (w, b, iters, *_) in zip(grid, path):
        assert 0 < iters < 5000
        for m, keep in ((0, fold != 0), (1, np.ones(n, bool))):
            sk = LogisticRegression(C=C, max_iter=10_000, tol=1e-10).fit(x[keep], y[keep])
            scale = np.abs(sk.coef_).max()
            np.testing.assert_allclose(w[m], sk.coef_, atol=2e-3 * scale)
            np.testing.assert_allclose(b[m] - b[m].mean(), sk.intercept_ - sk.intercept_.mean(), atol=2e-3 * max(scale, 1))


def test_lbfgs_hinge_head_is_at_least_as_good_as_adam(synthetic):
    """The smoothed-hinge L-BFGS fit's true Crammer-Singer objective is within the smoothing bound (tau log K) of the
    Adam fit's: hinge(w_L) <= smooth(w_L) <= smooth(w*) <= hinge(w*) + tau log K <= hinge(w_Adam) + tau log K."""
    from cnncodes.heads.lbfgs import lbfgs_path
    from cnncodes.heads.torch_solver import SMOOTH_HINGE_TAU, train_torch

    with Cache(synthetic) as c:
        x, y = c.load("train")
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    k, n = int(y.max()) + 1, len(y)

    def objective(w, b, C):
        s = x @ w.T + b
        margins = 1 + s - s[np.arange(n), y][:, None]
        margins[np.arange(n), y] = 0
        return np.maximum(margins.max(1), 0).mean() + (w ** 2).sum() / (2 * C * n)

    fold, held = np.zeros(n, np.int64), np.array([-1])
    for C in (0.01, 1.0):
        (wl, bl, *_), = lbfgs_path(x, y, k, fold, held, [C], "hinge")
        wa, ba, _ = train_torch(x, y, k, fold, held, np.array([C]), "hinge")
        assert objective(wl[0], bl[0], C) <= objective(wa[0], ba[0], C) + SMOOTH_HINGE_TAU * np.log(k) + 1e-4
        assert ((x @ wl[0].T + bl[0]).argmax(1) == (x @ wa[0].T + ba[0]).argmax(1)).mean() > 0.95


def test_in_memory_torch_heads_use_lbfgs_and_say_so(synthetic):
    """Codes in memory and auto epochs: L-BFGS along C (noted in the report, stops like svm/logreg);
    a fixed max_iter keeps the batched Adam path."""
    for clf in ("linear", "linear-svm"):
        head, r = fit_head(synthetic, clf)
        assert any("full-batch L-BFGS" in note for note in r["selection"]["notes"])
        assert r["splits"]["val"]["accuracy"] > 0.9
        _, ra = fit_head(synthetic, clf, max_iter=5)
        assert not any("L-BFGS" in note for note in ra["selection"]["notes"])
        assert len(ra["selection"]["cv_scores"]) == len(heads.C_GRID)


def _correlated_codes(n: int, k: int, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standardised codes whose variance decays over directions (like CNN codes): an ill-conditioned fit."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    latent = rng.normal(size=(n, d)) + 1.5 * rng.normal(size=(k, d))[y]
    x = latent @ (rng.normal(size=(d, d)) * (1.0 + np.arange(d))[:, None] ** -1.5) + 0.01 * rng.normal(size=(n, d))
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32), y


@pytest.mark.parametrize("k", [3, 2])
@pytest.mark.parametrize("n", [150, 20])  # more rows than dimensions, and fewer (fitted in the row space: n < 0.75 D)
def test_lbfgs_squared_hinge_is_linearsvc(n, k):
    """The "squared-hinge" L-BFGS fit is LinearSVC(C)'s optimum (one-vs-rest, intercept penalised), stored as
    LinearSVC's rows are (two classes: [-w/2, w/2])."""
    from sklearn.svm import LinearSVC

    from cnncodes.heads.format import as_class_rows
    from cnncodes.heads.lbfgs import lbfgs_path, prepare

    x, y = _correlated_codes(n, k, d=40)
    assert (prepare(x, y).space.basis is not None) == (n == 20)  # the row space is what n=20 tests
    fold = (np.arange(n) // k) % 2  # every class on both sides
    grid = [0.01, 1.0]
    for C, (w, b, iters, *_) in zip(grid, lbfgs_path(x, y, k, fold, np.array([0, -1]), grid, "squared-hinge",
                                                     max_iter=5000, rtol=1e-10)):
        assert iters < 5000
        for m, rows in ((0, fold != 0), (1, np.ones(n, bool))):
            sk = LinearSVC(C=C, tol=1e-10, max_iter=200_000).fit(x[rows], y[rows])
            coef, icpt = as_class_rows(sk.coef_, sk.intercept_)
            scale = np.abs(coef).max()
            np.testing.assert_allclose(w[m], coef, atol=5e-3 * scale)
            np.testing.assert_allclose(b[m], icpt, atol=5e-3 * max(scale, 1))


@pytest.mark.parametrize("loss", ["softmax", "squared-hinge"])
def test_preconditioning_changes_the_steps_not_the_optimum(loss):
    """The preconditioner is a change of variables: the same optimum as plain L-BFGS (the squared hinge, whose
    curvature the codes' correlations spoil most, in far fewer iterations); a start at the optimum takes no step."""
    from cnncodes.heads.lbfgs import lbfgs_path

    x, y = _correlated_codes(600, 4)
    fold, held, grid = np.zeros(600, np.int64), np.array([-1]), [0.1, 10.0]
    plain = list(lbfgs_path(x, y, 4, fold, held, grid, loss, precondition=False, max_iter=5000, rtol=1e-7))
    pre = list(lbfgs_path(x, y, 4, fold, held, grid, loss, max_iter=5000, rtol=1e-7))
    def objective(w, b, C):  # the fitted objective, in float64
        s = x @ w[0].T + b[0]
        if loss == "softmax":
            data = np.mean(np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1) - s[np.arange(len(y)), y])
            return data + (w ** 2).sum() / (2 * C * len(y))
        t = np.where(np.arange(4) == y[:, None], 1.0, -1.0)
        return np.mean((np.maximum(0, 1 - t * s) ** 2).sum(1)) + ((w ** 2).sum() + (b ** 2).sum()) / (2 * C * len(y))

    for C, (wp, bp, *_), (wq, bq, *_) in zip(grid, plain, pre):
        assert abs(objective(wq, bq, C) - objective(wp, bp, C)) <= 1e-4 * objective(wp, bp, C)
        assert ((x @ wq[0].T + bq[0]).argmax(1) == (x @ wp[0].T + bp[0]).argmax(1)).mean() > 0.98
    if loss == "squared-hinge":
        assert sum(f.iterations for f in pre) < 0.6 * sum(f.iterations for f in plain)
    w, b, *_ = pre[-1]
    again, = lbfgs_path(x, y, 4, fold, held, [grid[-1]], loss, init=(w, b))
    assert again.iterations <= 1 and again.converged  # at most the closing Newton step


def test_fit_head_options_are_one_config_and_the_cli_is_built_from_it(synthetic):
    """HeadConfig holds every option once: the CLI's flags are its fields with its defaults, a config
    passed whole fits what the same keywords fit, and a bad value or name is refused before any work."""
    import dataclasses

    from cnncodes.cli.head_cmd import fit_head_command
    from cnncodes.heads import HeadConfig

    names = {f.name for f in dataclasses.fields(HeadConfig)} - {"grid", "patience"}  # API-only fields
    defaults = {p.name: p.default for p in fit_head_command.params if p.name in names}
    assert set(defaults) == names and HeadConfig(**defaults) == HeadConfig()
    params = fit_head_command.make_context("fit-head", ["c.h5", "-o", "h.h5", "--clf", "svm", "--C", "0.1",
                                                        "--epochs", "7", "--tta"]).params
    assert HeadConfig(**{k: v for k, v in params.items() if k in names}) == HeadConfig(clf="svm", C="0.1", max_iter=7,
                                                                                          tta=True)
    whole, _ = fit_head(synthetic, config=HeadConfig(clf="logreg", C=0.1, tta=True))
    keywords, _ = fit_head(synthetic, "logreg", 0.1, tta=True)
    np.testing.assert_array_equal(whole.coef, keywords.coef)
    with pytest.raises(TypeError, match="unexpected keyword argument.*folds_n.*fields of HeadConfig"):
        fit_head(synthetic, folds_n=3)
    for bad, message in [({"clf": "rf"}, "unknown --clf 'rf'"), ({"C": -1}, "--C must be 'auto' or a positive"),
                         ({"folds": 1}, "--folds must be >= 2"), ({"max_iter": 0}, "--epochs must be >= 1")]:
        with pytest.raises(CnnCodesError, match=message):
            fit_head(synthetic, **bad)
