"""The head names (`--clf`), defined once for the API and the CLI; no heavy imports here."""

CLFS = ("svm", "logreg", "linear", "linear-svm")
TORCH_CLFS = {"linear": "softmax", "linear-svm": "hinge"}  # torch heads and their loss
# One value per decade; the CV path runs ascending (most regularised first).
C_GRID = (1e-05, 0.0001, 0.001, 0.01, 0.1, 1.0, 10.0)
PATIENCE = 2  # C values without a better CV accuracy after which the in-memory heads stop the C path
HOLDOUT_ABOVE = 50_000  # train codes above which C is chosen on a held-out tenth (one fold model), not k-fold
LBFGS_MEMORY = 20  # curvature pairs the L-BFGS path keeps (`lbfgs`; scipy's maxcor was set to this before)

