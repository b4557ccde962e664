"""bench/compare.py: end to end on a tiny generated dataset (1 epoch, full run), and its arithmetic
(extrapolation, medians, ceilings around every run, bounds) on fake paths, with no network."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_folder

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import compare  # noqa: E402

ROW_FIELDS = {"path", "kind", "settings", "settings_label", "differs_from_tutorial", "repeats", "seconds",
              "seconds_each", "extrapolated", "epochs_run", "epochs", "parts", "val_acc", "partial", "work",
              "ceilings_each", "ceilings", "model_only_s", "ceiling_share", "load_before", "load_after"}
NAMES = {"cache+svm", "cache+logreg", "cache+linear", "finetune", "fixed (tutorial)"}


def test_compare_full_run_writes_complete_json(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 6, "val": 3})
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    proc = subprocess.run([sys.executable, str(BENCH / "compare.py"), "--data", str(data), "--weights", "none",
                           "--epochs", "1", "--full", "--repeats", "2", "--ceiling-images", "8", "--image-size", "32",
                           "--json", str(out), "--plot", str(png)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "measured / bound" in proc.stdout and "Full run" in proc.stdout
    result = json.loads(out.read_text())
    assert result["bench"] == "compare" and "--full" in result["command"]
    assert {"cpu", "cores", "torch", "torchvision"} <= set(result["machine"])
    assert len(result["load_before"]) == 3 and len(result["load_after"]) == 3 and result["date"]
    rows = {r["path"]: r for r in result["paths"]}
    assert set(rows) == NAMES
    for r in rows.values():
        assert ROW_FIELDS <= set(r)
        assert not r["extrapolated"] and r["partial"] is None and 0.0 <= r["val_acc"] <= 1.0
        assert r["seconds"] > 0 and r["model_only_s"] > 0
        # --full: the epoch paths train once, --repeats is the cache path's; a ceiling before and after each run
        assert r["repeats"] == (2 if r["kind"] == "cache" else 1)
        assert len(r["ceilings_each"]) == r["repeats"] + 1
        assert all(v > 0 for c in r["ceilings_each"] for v in c.values())
    for name in ("finetune", "fixed (tutorial)"):
        assert rows[name]["epochs_run"] == 1 and set(rows[name]["ceilings"]) == {"forward", "train"}
        assert rows[name]["work"] == {"forward": 6, "train": 12}  # 1 epoch: 12 train steps' images, 6 val forwards
        assert rows[name]["settings"]["batch"] == 4  # the tutorial's batch
        assert len(rows[name]["val_acc_by_epoch"]) == 1 and rows[name]["val_acc_by_epoch"][-1] == rows[name]["val_acc"]
    assert rows["cache+logreg"]["work"] == {"forward": 18, "train": 0}
    assert len(result["ratios"]) == 6
    for q in result["ratios"]:
        c, o = rows[q["cache"]], rows[q["other"]]
        assert q["ratio"] == pytest.approx(o["seconds"] / c["seconds"])
        assert q["bound"] == pytest.approx(o["model_only_s"] / c["model_only_s"])
        assert q["ratio_over_bound"] == pytest.approx(q["ratio"] / q["bound"])
    assert png.stat().st_size > 1000


class FakeEpochs(compare.EpochPath):
    """An epoch path whose epochs take fixed, known times; ceilings count up per measurement."""

    name = "fake"

    def __init__(self, epoch_times: list[float], setup: float = 5.0):
        self.epoch_times, self.setup, self.measured = epoch_times, setup, 0

    def settings(self, ctx):
        return compare.Settings("fp32", 4, False)

    def ceilings(self, ctx):
        self.measured += 1
        return {"forward": 10.0 * self.measured, "train": 5.0 * self.measured}

    def run_epochs(self, ctx, out, epochs):
        history = [{"train_images": 20, "val_images": 10, "epoch_time_s": t, "val_acc": (0.6, 0.9, 0.7)[i % 3]}
                   for i, t in enumerate(self.epoch_times[:epochs])]
        return self.setup + sum(h["epoch_time_s"] for h in history), history


def fake_context(tmp_path, **overrides) -> compare.Context:
    args = argparse.Namespace(epochs=10, full=False, measure_epochs=3, repeats=3)
    for k, v in overrides.items():
        setattr(args, k, v)
    return compare.Context(args, torch.device("cpu"), None, 2, {"train": 20, "val": 10}, tmp_path)


def test_extrapolated_run_adds_missing_epochs_at_median_time_and_has_no_final_accuracy(tmp_path):
    ctx = fake_context(tmp_path)
    out = FakeEpochs([4.0, 2.0, 3.0]).run_once(ctx, tmp_path)["fake"]
    assert out.measured_s == 5.0 + 9.0
    assert out.seconds == pytest.approx(14.0 + 7 * 3.0)  # 7 missing epochs at the median epoch time
    assert out.extrapolated and out.epochs_run == 3
    assert out.val_acc is None and out.partial == {"epoch": 3, "of": 10, "val_acc": 0.7}
    assert out.work.train == 10 * 20 and out.work.forward == 10 * 10  # the whole recipe's work


def test_full_run_is_measured_not_extrapolated_and_keeps_the_final_epoch_accuracy(tmp_path):
    ctx = fake_context(tmp_path, full=True, epochs=3)
    out = FakeEpochs([4.0, 2.0, 9.0]).run_once(ctx, tmp_path)["fake"]
    assert out.seconds == out.measured_s == 20.0 and not out.extrapolated
    assert out.val_acc == 0.7 and out.partial is None  # the last epoch's, never the best (0.9)
    assert out.extra["val_acc_by_epoch"] == [0.6, 0.9, 0.7]  # the whole curve is kept beside it


def test_measure_takes_medians_and_a_ceiling_around_every_run(tmp_path):
    ctx = fake_context(tmp_path, repeats=3)
    path = FakeEpochs([4.0, 2.0, 3.0])
    (row,) = compare.measure(path, ctx)
    assert path.measured == 4  # before the first run and after each of the 3
    assert row["ceilings"] == {"forward": 25.0, "train": 12.5}  # medians of 10,20,30,40 and 5,10,15,20
    assert row["model_only_s"] == pytest.approx(100 / 25.0 + 200 / 12.5)
    assert row["repeats"] == 3 and row["seconds"] == pytest.approx(35.0)
    assert row["ceiling_share"] == pytest.approx(row["model_only_s"] / 35.0)


def test_ratio_beside_its_bound():
    rows = [{"path": "cache+logreg", "kind": "cache", "seconds": 10.0, "model_only_s": 8.0, "extrapolated": False,
             "work": {"forward": 400, "train": 0}},
            {"path": "finetune", "kind": "epochs", "seconds": 300.0, "model_only_s": 400.0, "extrapolated": True,
             "work": {"forward": 3825, "train": 6100}}]
    (q,) = compare.ratios(rows)
    assert q["ratio"] == 30.0 and q["bound"] == 50.0 and q["ratio_over_bound"] == pytest.approx(0.6)
    assert q["extrapolated"]
    assert compare.nominal_bound(rows) == {"finetune": pytest.approx((3 * 6100 + 3825) / 400)}
