"""What is wrong with a dataset, found from its cached codes: label issues, duplicates and train/test leaks,
outliers (`cnncodes audit`).

Where things live (input -> output):

- `config`: `AuditConfig`, the options once (thresholds, neighbour search, pictures); torch-free.
- `labels`: out-of-fold probabilities of every train image from the grouped CV `fit-head` runs (the head and
  C it would choose), ranked by cleanlab's `find_label_issues`.
- `images`: one unit-length code per image (plain view, centred on the train mean), where the files are.
- `neighbours`: the k nearest images of each: blocked matmul over every pair (exact), or a faiss index.
- `duplicates`: exact (bytes, decoded pixels) and near (cosine) pairs; leaks (held-out near train) first.
- `outliers`: images far from their nearest neighbours (robust z-score against train).
- `pictures`, `output`: the grids, the CSV tables and summary.json, written as one new folder.
- `api`: `audit`, cache in, folder out.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_LAZY = {"audit": "api", "AuditConfig": "config", "NEAR": "config", "EXACT_UP_TO": "config",
         "find_label_issues": "labels", "out_of_fold_scores": "labels", "temperature_scale": "labels", "find_neighbours": "neighbours",
         "exact_neighbours": "neighbours", "faiss_neighbours": "neighbours"}
__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
