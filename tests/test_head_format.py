"""The head file as its users read it: scikit-learn's layout, rebuilt with h5py and numpy alone,
`LinearHead.to_sklearn`, old files, the documented example; and L-BFGS's honest stopping."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli, write_folder

from cnncodes.errors import CnnCodesError
from cnncodes.heads import LinearHead, fit_head
from cnncodes.store import Cache
from cnncodes.testing import write_synthetic_cache

DOCS = Path(__file__).resolve().parents[1] / "docs" / "formats.md"


# --------------------------------------------------------------------------- what a user does with head.h5


def rebuild_sklearn(head_path: Path):
    """What the docs tell a user to do, with h5py, numpy and scikit-learn only (no cnncodes here):
    StandardScaler(mean, scale) then LogisticRegression(coef, intercept, classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with h5py.File(head_path, "r") as f:
        scaler, lr = StandardScaler(), LogisticRegression()
        scaler.mean_, scaler.scale_ = f["mean"][()].astype(np.float64), f["scale"][()].astype(np.float64)
        scaler.var_, scaler.n_features_in_ = scaler.scale_ ** 2, len(scaler.mean_)
        lr.coef_, lr.intercept_ = f["coef"][()].astype(np.float64), f["intercept"][()].astype(np.float64)
        lr.classes_, lr.n_features_in_ = f["classes"].asstr()[()], len(scaler.mean_)
    return make_pipeline(scaler, lr)


@pytest.fixture(scope="module", params=[2, 3], ids=["binary", "3-class"])
def cli_head(request, tmp_path_factory) -> dict:
    """A logreg head fitted from the CLI on a small generated folder (resnet18, random weights, 32 px)."""
    k = request.param
    root = tmp_path_factory.mktemp(f"head{k}")
    data = write_folder(root / "data", {"train": 8, "val": 4}, classes=("ant", "bee", "wasp")[:k], size=32)
    cache, head = root / "c.h5", root / "head.h5"
    run_cli("extract", data, "-o", cache, "--weights", "none", "--image-size", "32", "--workers", "0")
    run_cli("fit-head", cache, "-o", head, "--clf", "logreg", "--C", "1")
    with Cache(cache) as c:
        x_train, y_train = c.load("train")
        x_val = c.features("val")[()]
    return {"k": k, "data": data, "cache": cache, "head": head, "x_train": x_train, "y_train": y_train, "x": x_val}


def test_head_rebuilt_with_h5py_alone_gives_the_heads_probabilities(cli_head):
    """The issue's check: scikit-learn rebuilt from the file's datasets, nothing else, predicts the head's
    probabilities (1e-6), and those are LogisticRegression(C)'s own on the standardised train codes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, k = cli_head["x"], cli_head["k"]
    rebuilt = rebuild_sklearn(cli_head["head"])
    head = LinearHead.load(cli_head["head"])
    assert rebuilt[-1].coef_.shape == ((1, x.shape[1]) if k == 2 else (k, x.shape[1]))
    np.testing.assert_allclose(rebuilt.predict_proba(x), head.predict_proba(x), rtol=0, atol=1e-6)
    assert list(rebuilt.predict(x)) == [head.classes[i] for i in head.predict(x)]
    # the stored numbers mean what scikit-learn means by them (w, not w / 2): a fresh fit agrees
    z_train = StandardScaler().fit(cli_head["x_train"])
    own = LogisticRegression(C=head.C, tol=1e-10, max_iter=10_000).fit(z_train.transform(cli_head["x_train"]),
                                                                       cli_head["y_train"])
    np.testing.assert_allclose(rebuilt.predict_proba(x), own.predict_proba(z_train.transform(x)), atol=2e-3)


def test_head_file_describes_itself(cli_head):
    with h5py.File(cli_head["head"], "r") as f:
        assert f.attrs["format"] == "cnncodes-head" and f.attrs["format_version"] == 2
        assert f.attrs["sklearn_estimator"] == "LogisticRegression" and f.attrs["n_classes"] == cli_head["k"]
        assert "(x - mean) / scale" in f.attrs["description"]
        for name in ("coef", "intercept", "mean", "scale", "classes"):
            assert f[name].attrs["description"] and f[name].attrs["shape"]
        assert "(x - mean) / scale" in f["coef"].attrs["description"]
        assert "(1, D) for K = 2" in f["coef"].attrs["shape"]


def test_version1_two_row_heads_still_load(cli_head, tmp_path):
    """A head written before the scikit-learn layout (binary: two rows [-w/2, w/2]) loads and predicts
    as before; new files hold one row."""
    head = LinearHead.load(cli_head["head"])
    old = tmp_path / "old.h5"
    head.save(old)
    with h5py.File(old, "r+") as f:
        f.attrs["format_version"] = 1
        for name, rows in zip(("coef", "intercept"), (head.coef, head.intercept)):
            del f[name]
            f[name] = rows.astype(np.float32)  # version 1 wrote the class rows as they are in memory
    x = cli_head["x"]
    np.testing.assert_allclose(LinearHead.load(old).predict_proba(x), head.predict_proba(x), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(LinearHead.load(old).predict(x), head.predict(x))
    with h5py.File(old, "r+") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(CnnCodesError, match="head format version 3 is not supported .*upgrade cnncodes"):
        LinearHead.load(old)


def test_binary_softmax_of_mirrored_rows_is_the_sigmoid():
    """Why the in-memory two rows are exact: softmax([-s/2, s/2]) = (1 - sigmoid(s), sigmoid(s))."""
    from scipy.special import expit

    from cnncodes.heads.format import as_class_rows, softmax

    s = np.linspace(-40, 40, 81)
    w, b = as_class_rows(np.array([[1.0]]), np.array([0.0]))
    p = softmax(s[:, None] @ w.T + b)
    np.testing.assert_allclose(p[:, 1], expit(s), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(p[:, 0], expit(-s), rtol=1e-12, atol=1e-300)


def test_any_two_rows_are_saved_as_their_difference(tmp_path):
    """A solver's two rows (r0, r1) (the torch heads) are stored as scikit-learn's one row r1 - r0:
    the same probabilities and decisions before and after the file."""
    rng = np.random.default_rng(0)
    coef, icpt = rng.normal(size=(2, 5)), rng.normal(size=2)
    x = rng.normal(size=(20, 5))
    head = LinearHead(coef.copy(), icpt.copy(), np.zeros(5), np.ones(5), ["a", "b"], "linear", 1.0)
    raw = x @ coef.T + icpt
    np.testing.assert_allclose(head.predict_proba(x), np.exp(raw) / np.exp(raw).sum(1, keepdims=True), rtol=1e-12)
    head.save(tmp_path / "h.h5")
    with h5py.File(tmp_path / "h.h5", "r") as f:
        np.testing.assert_allclose(f["coef"][()], [coef[1] - coef[0]], rtol=1e-6)
        np.testing.assert_allclose(f["intercept"][()], [icpt[1] - icpt[0]], rtol=1e-6)
    loaded = LinearHead.load(tmp_path / "h.h5")
    np.testing.assert_allclose(loaded.predict_proba(x), head.predict_proba(x), atol=1e-6)
    np.testing.assert_array_equal(loaded.predict(x), raw.argmax(1))


# --------------------------------------------------------------------------- LinearHead.to_sklearn


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("clf", ["logreg", "svm", "linear", "linear-svm"])
def test_to_sklearn_is_a_fitted_pipeline_equal_to_the_head(tmp_path, clf, k):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    from sklearn.utils.validation import check_is_fitted

    cache = write_synthetic_cache(tmp_path / f"c{k}.h5", {"train": 30, "val": 12}, dim=16, n_classes=k,
                                  separation=1.5)
    head, _ = fit_head(cache, clf, 0.1, max_iter=30)
    pipe = head.to_sklearn()
    assert isinstance(pipe, Pipeline) and isinstance(pipe[0], StandardScaler)
    assert isinstance(pipe[-1], LogisticRegression if clf in ("logreg", "linear") else LinearSVC)
    for step in (pipe, pipe[0], pipe[-1]):
        check_is_fitted(step)
    assert pipe[-1].C == head.C and pipe[0].n_features_in_ == pipe[-1].n_features_in_ == 16
    assert pipe[0].n_samples_seen_ == 30 and list(pipe[-1].classes_) == head.classes
    with Cache(cache) as c:
        x = c.features("val")[()].astype(np.float64)
    scores = head.decision_function(x)
    np.testing.assert_allclose(pipe.decision_function(x), scores[:, 1] - scores[:, 0] if k == 2 else scores,
                               rtol=1e-6, atol=1e-6)
    assert list(pipe.predict(x)) == [head.classes[i] for i in head.predict(x)]
    if clf in ("logreg", "linear"):
        np.testing.assert_allclose(pipe.predict_proba(x), head.predict_proba(x), rtol=0, atol=1e-6)
    # and after a round trip through the file
    head.save(tmp_path / "h.h5")
    again = LinearHead.load(tmp_path / "h.h5").to_sklearn()
    np.testing.assert_allclose(again.decision_function(x), pipe.decision_function(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the documented example


def _doc_blocks() -> list[str]:
    """The python code blocks of docs/formats.md's head-file section, verbatim."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Head file (HDF5)", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_documented_rebuild_runs_verbatim(cli_head, monkeypatch):
    """The docs' h5py + numpy example (and its scikit-learn variant) give the head's probabilities."""
    blocks = _doc_blocks()
    assert blocks, "docs/formats.md has no python example in its 'Head file (HDF5)' section"
    monkeypatch.chdir(cli_head["head"].parent)  # the examples read head.h5 from the working folder
    head = LinearHead.load(cli_head["head"])
    x = cli_head["x"]
    for block in blocks:
        env = {"codes": x}
        exec(compile(block, str(DOCS), "exec"), env)  # noqa: S102 - our own documentation
        np.testing.assert_allclose(env["proba"], head.predict_proba(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- L-BFGS: agreement and honest stops


def _mixed_codes(n: int, k: int, d: int = 64, rank: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real-like codes: a few latent factors (class means plus per-image variation) mixed into d correlated
    dimensions by a random matrix, plus small noise, standardised: low effective rank, ill-conditioned."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    z = rng.normal(size=(n, rank)) + 1.2 * rng.normal(size=(k, rank))[y]
    x = z @ rng.normal(size=(rank, d)) + 0.05 * rng.normal(size=(n, d))
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32), y


@pytest.mark.parametrize("codes", ["correlated", "isotropic"])
@pytest.mark.parametrize("k", [2, 3])
def test_lbfgs_softmax_is_logistic_regression(codes, k):
    """The L-BFGS softmax fit is LogisticRegression(C)'s optimum on binary and multiclass problems, on isotropic
    and on correlated low-rank codes: the same coef_/intercept_ (binary: its two rows' difference, scikit-learn's
    one row) and the same probabilities, for a fold model and the full-data model. Within 5e-3 of the largest
    weight: the objective is float32."""
    from sklearn.linear_model import LogisticRegression

    from cnncodes.heads.format import as_sklearn_rows, softmax
    from cnncodes.heads.lbfgs import lbfgs_path

    n = 240
    if codes == "correlated":
        x, y = _mixed_codes(n, k)
    else:
        rng = np.random.default_rng(1)
        y = np.arange(n) % k
        x = rng.normal(size=(n, 40)) + 0.6 * rng.normal(size=(k, 40))[y]
        x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    fold, grid = (np.arange(n) // k) % 2, [0.01, 1.0]  # every class on both sides
    for C, (w, b, *_) in zip(grid, lbfgs_path(x, y, k, fold, np.array([0, -1]), grid, "softmax", max_iter=5000,
                                              rtol=1e-9)):
        for m, keep in ((0, fold != 0), (1, np.ones(n, bool))):
            sk = LogisticRegression(C=C, max_iter=10_000, tol=1e-10).fit(x[keep], y[keep])
            coef, icpt = as_sklearn_rows(w[m], b[m])
            scale = np.abs(sk.coef_).max()
            np.testing.assert_allclose(coef, sk.coef_, atol=5e-3 * scale)
            if k == 2:
                np.testing.assert_allclose(icpt, sk.intercept_, atol=5e-3 * max(scale, 1))
            else:  # softmax intercepts are defined up to a common shift
                np.testing.assert_allclose(icpt - icpt.mean(), sk.intercept_ - sk.intercept_.mean(),
                                           atol=5e-3 * max(scale, 1))
            np.testing.assert_allclose(softmax(x @ w[m].T + b[m]), sk.predict_proba(x), atol=1e-3)


def _line_search_failing(monkeypatch, fails) -> list:
    """Make L-BFGS's line search report "no step" whenever `fails(call number, largest gradient entry)` holds
    (as it does at float32 precision, or along a bad direction), else search for real. Returns the directions
    it was called with."""
    from cnncodes.heads import lbfgs

    real, calls = lbfgs._line_search, []

    def search(objective, w, f, g, d):
        calls.append(d.clone())
        return None if fails(len(calls), float(g.abs().max())) else real(objective, w, f, g, d)

    monkeypatch.setattr(lbfgs, "_line_search", search)
    return calls


def test_a_stop_far_from_the_optimum_is_not_converged(tmp_path, monkeypatch):
    """A line search that finds no step far from the optimum: L-BFGS drops its curvature memory and tries once
    more from the preconditioned gradient, then once more in float64; failing there too, the fit report says it
    did not converge, and why."""
    import torch

    cache = write_synthetic_cache(tmp_path / "c.h5", {"train": 30, "val": 10}, dim=16, n_classes=3, separation=1.5)
    calls = _line_search_failing(monkeypatch, lambda call, g: call > 2)  # two steps, then no step
    _, report = fit_head(cache, "linear", 1.0)
    assert len(calls) == 5  # two steps; failures along the L-BFGS direction, the gradient's, and in float64
    assert not np.allclose(calls[2].numpy(), calls[3].numpy())  # the retry is a different direction
    assert [d.dtype for d in calls[2:]] == [torch.float32, torch.float32, torch.float64]
    notes = [n for n in report["selection"]["notes"] if "did not converge" in n]
    assert len(notes) == 1
    assert "at C=1 after 2 iterations (line search failed in float64: no step decreased the objective" in notes[0]


def test_a_failed_line_search_far_from_the_optimum_restarts_and_converges(monkeypatch):
    """The retry is real work, not a second report: the line search made to fail once, far from the optimum,
    L-BFGS goes on from the preconditioned gradient and reaches LogisticRegression's optimum, no note."""
    import head_reference as ref

    from cnncodes.heads.lbfgs import lbfgs_path

    x, y = _mixed_codes(120, 3, d=16)
    calls = _line_search_failing(monkeypatch, lambda call, g: call == 3)
    notes: list[str] = []
    fit, = lbfgs_path(x, y, 3, np.zeros(120, np.int64), np.array([-1]), [1.0], "softmax", notes=notes)
    # every call but the failed one took a step (and the closing full Newton step takes none)
    assert len(calls) > 4 and len(calls) - 1 <= fit.iterations <= len(calls) and notes == [] and fit.converged
    best = ref.optimum("logreg", x, y, 3, 1.0)
    assert ref.objective("logreg", x, y, fit.w[0], fit.b[0], 1.0) <= best[0] * (1 + 1e-4)


def test_a_line_search_failure_in_float32_goes_on_in_float64(monkeypatch):
    """Where float32 rounding hides the decrease that is left (here: made to, near the optimum), the fit goes on in
    float64 and meets the rule there: no retry in float32 first, no warning, no note, and the optimum."""
    import head_reference as ref

    from cnncodes.heads.lbfgs import lbfgs_path

    import torch

    from cnncodes.heads import lbfgs

    x, y = _mixed_codes(120, 3, d=16)
    dtypes = []
    search = lbfgs._line_search

    def failing_in_float32(objective, w, f, g, d):
        dtypes.append(w.dtype)
        return None if w.dtype == torch.float32 and float(g.abs().max()) < 1e-3 else search(objective, w, f, g, d)

    monkeypatch.setattr(lbfgs, "_line_search", failing_in_float32)
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit, = lbfgs_path(x, y, 3, np.zeros(120, np.int64), np.array([-1]), [1.0], "softmax", notes=notes)
    assert torch.float64 in dtypes and fit.converged and notes == []
    assert ref.objective("logreg", x, y, fit.w[0], fit.b[0], 1.0) <= ref.optimum("logreg", x, y, 3, 1.0)[0] * (1 + 1e-4)


def test_line_search_accepts_a_decrease_below_float32_resolution():
    """Close to the optimum the objective's decrease is below float32 rounding of its value, where Armijo's test
    cannot see it; the approximate Wolfe conditions (from the directional derivative) take the step."""
    import torch

    from cnncodes.heads.lbfgs import _line_search

    def objective(w):  # 1000 + |w|^2 / 2, its value rounded to float32 as the fitted losses are
        return torch.tensor([float(np.float32(1000.0) + np.float32(0.5 * float((w * w).sum())))]), w.clone()

    w = torch.full((2, 3, 4), 1e-3)
    values, g = objective(w)
    step = _line_search(objective, w, float(values.sum()), g, -g)  # the Newton step: lands on the optimum
    assert step is not None and float(step[0].abs().max()) == 0.0
    assert float(step[1].sum()) == float(values.sum())  # no decrease visible in the value


@pytest.mark.parametrize("n, d", [(50, 2048), (245, 2048), (800, 40), (2000, 64), (1500, 1200)])
def test_preconditioner_inverse_is_symmetric_positive_definite_at_small_mu(n, d):
    """h0 = (S + mu I)^-1 of the estimated S stays symmetric positive definite however small mu gets (large n C), on
    the codes the fit sees (n < 0.75 d: their row space, n + 1 columns; else the codes): computed whole up to
    EXACT_COLUMNS, else with a complement scaled by 1 / (rest + mu). In float32 the complement's cancellation made it
    indefinite at 245 x 2048 and mu = 1e-5; float32 steps through it stay descent directions."""
    import torch

    from cnncodes.heads.lbfgs import prepare

    x, y = _mixed_codes(n, 3, d=d)
    prepared = prepare(x, y)
    pre, cols = prepared.pre, prepared.xt.shape[1] + 1
    v, top = pre.vectors, pre.top
    g = torch.randn(64, cols, generator=torch.Generator().manual_seed(0))
    for mu in (1e-2, 1e-5, 1e-8):
        h = pre.inverse(mu)(torch.eye(cols, dtype=torch.float64))  # the operator as a matrix (rows in, rows out)
        expected = (v * (1 / (top + mu))) @ v.T
        if v.shape[1] < cols:
            expected += (torch.eye(cols, dtype=torch.float64) - v @ v.T) / (pre.rest + mu)
        scale = float(expected.abs().max())
        assert float((h - h.T).abs().max()) <= 1e-9 * scale
        smallest = float(torch.linalg.eigvalsh((h + h.T) / 2).min())
        assert smallest > 0.5 / (float(top.max()) + mu)
        np.testing.assert_allclose(h.numpy(), expected.numpy(), atol=1e-9 * scale)
        assert bool(((g * pre.inverse(mu)(g)).sum(1) > 0).all())  # float32 gradients: descent directions


def test_line_search_backs_off_a_step_that_overflows():
    """A trial step where the objective is not finite (overflow far from the start) is shrunk, not taken."""
    import torch

    from cnncodes.heads.lbfgs import _line_search

    def objective(w):  # |w - 1|^2 / 2, infinite beyond |w| > 2
        w64 = w.double()
        if float(w64.abs().max()) > 2:
            return torch.tensor([float("inf")]), torch.full_like(w, float("nan"))
        return (0.5 * ((w64 - 1) ** 2).sum()).view(1), (w - 1).clone()

    w = torch.zeros(2, 2, 3)
    values, g = objective(w)
    step = _line_search(objective, w, float(values.sum()), g, -10 * g)  # the full step lands at 10: infinite
    assert step is not None and float(step[1].sum()) < float(values.sum()) and float(step[0].abs().max()) <= 2


def test_lbfgs_short_of_tol_warns_without_notes_and_names_the_iteration_limit():
    from sklearn.exceptions import ConvergenceWarning

    from cnncodes.heads.lbfgs import lbfgs_path

    x, y = _mixed_codes(120, 3, d=16)
    args = (x, y, 3, np.zeros(120, np.int64), np.array([-1]), [10.0], "softmax")
    with pytest.warns(ConvergenceWarning, match=r"did not converge at C=10 after 2 iterations \(iteration limit \(2\)"):
        list(lbfgs_path(*args, max_iter=2))
    notes: list[str] = []
    list(lbfgs_path(*args, max_iter=2, notes=notes))
    assert len(notes) == 1 and "iteration limit (2)" in notes[0]
