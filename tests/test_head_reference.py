"""Every head at its optimum: the shipped solver (`heads.lbfgs` at its shipped rule, iteration limit and
warm starts along C, as `fit-head` runs it) against scikit-learn solved tightly in float64
(`head_reference`), over the shapes users have.

Each case: relative objective gap <= 1e-4 and val predictions agreeing >= 99.5%. Up to C = 100 every
fit must get there and say it converged; beyond, a fit may instead say it did not converge (and CV
then never ranks that C: tests/test_heads.py). The path (fold-model style: one model, warm-started from
the previous C) and the fixed-C fit (`fit_linear` with `--C`, from zero) are both checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import head_reference as ref
from cnncodes.heads import HeadConfig, TrainSet, as_sklearn_rows
from cnncodes.heads.lbfgs import lbfgs_path
from cnncodes.heads.selection import LBFGS_LOSS, fit_linear

GAP, AGREE = 1e-4, 0.995
MUST_CONVERGE_UP_TO = 100.0
CLFS = ("svm", "logreg", "linear", "linear-svm")


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    d: int
    k: int
    Cs: tuple[float, ...]
    rank: int = 0  # > 0: codes of this rank (rank-deficient)
    duplicate: bool = False  # every train row twice
    major: float = 1.0  # class 0 this many times the others
    separation: float = 2.0


FAST = [
    Case("50x2048 k3 (n << d)", 50, 2048, 3, (1e-6, 1e-1, 100.0, 1e4)),
    Case("245x2048 k2 (ants/bees' shape)", 245, 2048, 2, (1e-5, 1.0, 10.0, 100.0)),
    Case("150x128 k12 (n ~ d)", 150, 128, 12, (1e-3, 1.0, 100.0)),
    Case("2000x64 k3 (n > d)", 2000, 64, 3, (1e-4, 1.0, 100.0)),
    Case("400x128 k3 rank 20 (rank-deficient)", 400, 128, 3, (1e-2, 100.0, 1e4), rank=20),
    Case("150x96 k3 duplicated rows", 150, 96, 3, (1.0, 100.0), duplicate=True),
    Case("660x64 k3 one class 10x", 660, 64, 3, (1e-1, 100.0), major=10.0),
]
SLOW = [
    Case("500x64 k100 (many classes)", 500, 64, 100, (1e-2, 10.0, 100.0), separation=4.0),
    Case("5000x512 k12", 5000, 512, 12, (1e-5, 1e-2, 1.0, 100.0)),
    Case("245x2048 k12", 245, 2048, 12, (1e-4, 1e-1, 10.0, 100.0, 1e4)),
    Case("300x256 k12", 300, 256, 12, (1e-4, 1e-2, 1.0, 100.0)),
    Case("2000x64 k100", 2000, 64, 100, (1e-4, 1e-1, 10.0, 100.0), separation=4.0),
]


# Known shortfall (a slow shape; the solver of commit c60b15c failed it the same way): at C = 1e-4 on 245 x 2048 codes
# of 12 classes the softmax heads end 2e-7 above the optimum, yet only 99.0% of val predictions agree. The 12 classes'
# scores lie within 1e-3 of each other for ~1% of the val codes, and the weights' error that a 3e-5 rule allows moves
# scores by ~2e-3; even 1e-11 above the optimum the head agreed with LogisticRegression (tol 1e-10) on 99.75% only.
# The objective gap is checked as everywhere; the agreement by the strict xfail below.
NEAR_TIES = {("245x2048 k12", "logreg", 1e-4), ("245x2048 k12", "linear", 1e-4)}


def codes(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standardised train codes, labels, val codes, val labels: post-ReLU-like codes with class means and a decaying
    spectrum (as CNN codes have), standardised by the train statistics as `fit-head` does."""
    rng = np.random.default_rng(seed)
    latent = case.rank or case.d
    basis = rng.normal(size=(latent, case.d)) * ((1.0 + np.arange(latent)) ** -0.5)[:, None]
    centers = rng.normal(size=(case.k, latent)) * case.separation / np.sqrt(latent)
    share = np.r_[case.major, np.ones(case.k - 1)]

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.sort(rng.choice(case.k, size=n, p=share / share.sum()))
        y[:case.k] = np.arange(case.k)  # every class present
        z = (centers[y] + rng.normal(size=(n, latent))) @ basis
        return np.maximum(z + 0.5, 0.0), y

    n = case.n // 2 if case.duplicate else case.n
    x, y = draw(n)
    if case.duplicate:
        x, y = np.repeat(x, 2, axis=0), np.repeat(y, 2)
    xv, yv = draw(max(400, case.n // 2))
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0
    return (x - mean) / scale, y, (xv - mean) / scale, yv


def check(case: Case, clf: str, C: float, coef: np.ndarray, icpt: np.ndarray, converged: bool, data,
          ties: bool = False) -> list[str]:
    """What is wrong with one fit (empty: nothing). The val agreement of a NEAR_TIES fit only with `ties`."""
    x, y, xv, yv = data
    coef, icpt = as_sklearn_rows(coef, icpt)
    where = f"{case.name} {clf} C={C:g}"
    if not converged:
        return [] if C > MUST_CONVERGE_UP_TO else [f"{where}: did not converge"]
    mine = ref.objective(clf, x, y, coef, icpt, C)
    best, ref_coef, ref_icpt = ref.optimum(clf, x, y, case.k, C, start=(coef, icpt))
    gap = (mine - best) / best
    agree = float((_predict(xv, coef, icpt) == _predict(xv, ref_coef, ref_icpt)).mean())
    problems = []
    if not gap <= GAP:
        problems.append(f"{where}: objective {gap:.2e} above the optimum")
    if not agree >= AGREE and (ties or (case.name, clf, C) not in NEAR_TIES):
        problems.append(f"{where}: {agree:.1%} of val predictions agree")
    return problems


def _predict(x, coef, icpt):
    scores = x @ coef.T + icpt
    return (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 else scores.argmax(1)


def run_path(case: Case, clf: str, data, ties: bool = False) -> list[str]:
    """The warm-started C path at the shipped settings, one model on all rows (as a fold model is fitted)."""
    x, y = data[0], data[1]
    fold = np.zeros(len(y), np.int64)
    path = lbfgs_path(x.astype(np.float32), y, case.k, fold, np.array([-1]), case.Cs, LBFGS_LOSS[clf], notes=[])
    problems = []
    for C, fit in zip(case.Cs, path):
        problems += check(case, clf, C, fit.w[0], fit.b[0], fit.converged, data, ties)
    return problems


def run_fixed(case: Case, clf: str, C: float, data) -> list[str]:
    """`fit-head --C C`: fit_linear from zero on the in-memory train set, as the command runs it."""
    x, y = data[0], data[1]
    train = TrainSet(x.astype(np.float32), y, np.arange(len(y)), np.zeros(len(y), np.int16), np.zeros(x.shape[1]),
                     np.ones(x.shape[1]), np.arange(case.k))
    w, b, sel = fit_linear(train, HeadConfig(clf=clf, C=C))
    converged = not any("did not converge" in note for note in sel.notes)
    return check(case, clf, C, w, b, converged, data)


def _params(cases):
    return [pytest.param(case, clf, id=f"{case.name}-{clf}") for case in cases for clf in CLFS]


@pytest.mark.parametrize("case, clf", _params(FAST))
def test_every_head_reaches_the_optimum_along_the_C_path(case, clf):
    problems = run_path(case, clf, codes(case))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case, clf", _params([FAST[1], FAST[2]]))
def test_a_fixed_C_fit_reaches_the_optimum(case, clf):
    data = codes(case)
    problems = [p for C in (case.Cs[0], 100.0) for p in run_fixed(case, clf, C, data)]
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("case, clf", _params(SLOW))
def test_every_head_reaches_the_optimum_on_large_shapes(case, clf):
    problems = run_path(case, clf, codes(case))
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="val predictions at near-ties: see NEAR_TIES")
@pytest.mark.parametrize("name, clf, C", sorted(NEAR_TIES))
def test_known_near_ties_at_small_C(name, clf, C):
    case = next(c for c in SLOW if c.name == name)
    problems = [p for p in run_path(case, clf, codes(case), ties=True) if f"C={C:g}:" in p]
    assert not problems, "\n".join(problems)
