"""bench/compare.py end to end on a tiny generated dataset (1 epoch): every JSON field, sane values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import write_folder

BENCH = Path(__file__).resolve().parents[1] / "bench" / "compare.py"
ROW_FIELDS = {"path", "extract_s", "fit_s", "train_s", "eval_s", "images_per_s", "time_to_model_s", "val_acc",
              "epochs_run", "extrapolated", "note", "speedup_vs_finetune", "speedup_vs_fixed"}


def test_compare_runs_and_writes_complete_json(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 6, "val": 3})
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    proc = subprocess.run([sys.executable, str(BENCH), "--data", str(data), "--weights", "none", "--epochs", "1",
                           "--image-size", "32", "--json", str(out), "--plot", str(png)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "vs finetune" in proc.stdout and "model-only forward ceiling" in proc.stdout
    result = json.loads(out.read_text())
    assert {"hardware", "ceiling_images_per_s", "epochs", "arch", "paths", "date"} <= set(result)
    paths = {r["path"]: r for r in result["paths"]}
    assert set(paths) == {"cache+svm", "cache+logreg", "cache+linear", "finetune", "fixed (tutorial)"}
    for r in paths.values():
        assert ROW_FIELDS <= set(r)
        assert 0.0 <= r["val_acc"] <= 1.0 and r["time_to_model_s"] > 0 and r["images_per_s"] > 0
        assert not r["extrapolated"]
    for name in ("finetune", "fixed (tutorial)"):
        assert paths[name]["epochs_run"] == 1 and paths[name]["train_s"] > 0
    for clf in ("svm", "logreg", "linear"):
        row = paths[f"cache+{clf}"]
        assert row["extract_s"] > 0 and row["fit_s"] > 0
        assert abs(row["speedup_vs_finetune"] - paths["finetune"]["time_to_model_s"] / row["time_to_model_s"]) < 1e-9
    assert result["ceiling_images_per_s"] > 0 and png.stat().st_size > 1000
