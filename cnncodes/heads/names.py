"""The head names (`--clf`), defined once for the API and the CLI; no heavy imports here."""

CLFS = ("svm", "logreg", "linear", "linear-svm")
TORCH_CLFS = {"linear": "softmax", "linear-svm": "hinge"}  # torch heads and their loss
# One value per decade; the CV path runs ascending (most regularised first).
C_GRID = (1e-05, 0.0001, 0.001, 0.01, 0.1, 1.0, 10.0)
PATIENCE = 2  # C values without a better CV accuracy after which svm/logreg stop the C path
# Train codes above which svm and logreg solve their own objective by the torch L-BFGS path (`lbfgs`: every core on
# one model) instead of scikit-learn's one-core jobs: at 100k x 2048 codes the held-out tenth leaves scikit-learn one
# job, one busy core (logreg 99.8 s). Below it scikit-learn's solvers, one fold per core.
LBFGS_ABOVE = 20_000
