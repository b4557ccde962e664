"""The head names (`--clf`), defined once for the API and the CLI; no heavy imports here."""

CLFS = ("svm", "logreg", "linear", "linear-svm")
TORCH_CLFS = {"linear": "softmax", "linear-svm": "hinge"}  # torch heads and their loss
# One value per decade; the CV path runs ascending (most regularised first).
C_GRID = (1e-05, 0.0001, 0.001, 0.01, 0.1, 1.0, 10.0)
PATIENCE = 2  # C values without a better CV accuracy after which svm/logreg stop the C path
# Train codes above which logreg solves its own objective by the torch L-BFGS path (`lbfgs`: every core on one model)
# instead of scikit-learn's one-core jobs: at 100k x 2048 codes the held-out tenth leaves scikit-learn one job, one
# busy core (logreg 99.8 s). Below it LogisticRegression, one fold per core. svm always takes the L-BFGS path
# (LinearSVC's objective): on every real and synthetic set measured it was 2-4x faster than liblinear, whose dual
# solver crawls at large C (one C of a 720-image, 12-class set took a minute), with the same C and CV scores.
LBFGS_ABOVE = 20_000
HOLDOUT_ABOVE = 50_000  # train codes above which C is chosen on a held-out tenth (one fold model), not k-fold
LBFGS_MEMORY = 20  # curvature pairs the L-BFGS path keeps (`lbfgs`; scipy's maxcor was set to this before)


def solved_by_sklearn(clf: str, n_codes: int) -> bool:
    """Whether `clf` on `n_codes` train codes runs scikit-learn's LogisticRegression (else torch: L-BFGS or Adam)."""
    return clf == "logreg" and n_codes <= LBFGS_ABOVE
