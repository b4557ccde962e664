"""bench/device_check.py without CUDA: a smoke run of its CPU parts that says what it skipped.

CUDA is hidden (CUDA_VISIBLE_DEVICES=""), so this is the no-CUDA mode on a GPU machine too. The run
uses the generated JPEGs only (--photos none) and sizes smaller than its own smoke defaults: about
20 s on the 2-core dev VM (the script pins itself to one core without CUDA).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.py"
RECORD = ROOT / "bench" / "results" / "device_check.json"
SMALL = ["--photos", "none", "--images", "16", "--batch-size", "8", "--command-runs", "1", "--finetune-steps", "1",
         "--finetune-batch", "4", "--compare-photos", "4"]


def _run(*args: str, timeout: int = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def test_without_cuda_the_device_check_runs_its_cpu_parts_and_says_what_it_skipped(tmp_path):
    record_before = RECORD.stat().st_mtime_ns if RECORD.exists() else None
    out = tmp_path / "check.json"
    proc = _run(*SMALL, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    text = proc.stdout
    skipped = text[text.index("\nskipped:"):]
    for part in ("the test suite", "nvJPEG", "`cnncodes extract --decode gpu` (needs CUDA)",
                 "the photos (--photos none", "the full sizes (no CUDA: a smoke run at images 16,"):
        assert part in skipped, part
    assert "photos none: the generated JPEGs only" in text
    result = json.loads(out.read_text())
    assert result["bench"] == "device_check-cpu-mode" and result["photos"] is None
    assert result["sizes"]["images"] == 16 and "views_photos" not in result
    views = result["views_generated"]
    assert views["images"] == 14 and list(views["fallbacks"]) == ["4-channel JPEG (CMYK/YCCK); the device decoder "
                                                                  "takes 1 or 3"]
    assert result["targets"]["views within 1 grey level on average"] is True  # same libjpeg-turbo, oriented alike
    assert set(result["seconds"]) == {"views", "rates", "finetune", "head"}
    assert (RECORD.stat().st_mtime_ns if RECORD.exists() else None) == record_before  # the GPU record untouched


@pytest.mark.parametrize("args, message", [
    (["--out", str(RECORD)], "records a run on a GPU; without CUDA pass another --out"),
    (["--photos", "/no/such/folder"], "--photos /no/such/folder: no such folder"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = _run(*args, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("device_check: ") and message in lines[0]
