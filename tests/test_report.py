"""bench/report.py: README blocks regenerated from results files, idempotently, nothing else touched."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import report  # noqa: E402

HEADER = {"schema": 1, "command": "python bench/compare.py --data d --full", "date": "2026-11-25 18:00 UTC",
          "git_commit": "0123456789abcdef", "load_before": [0.1, 0.2, 0.3], "load_after": [0.4, 0.5, 0.6],
          "machine": {"cpu": "Test CPU", "cores": 2, "memory_gib": 8.0, "gpu": None, "torch": "2.x",
                      "torchvision": "0.y"}}


def compare_result(seconds: float) -> dict:
    def row(path, kind, secs, model_only, acc, extrapolated=False):
        return {"path": path, "kind": kind, "settings_label": "bf16, batch 4, channels_last", "repeats": 3,
                "seconds": secs, "extrapolated": extrapolated, "epochs_run": 1 if extrapolated else None,
                "epochs": 25, "val_acc": acc, "partial": {"epoch": 1, "of": 25, "val_acc": 0.8} if extrapolated else None,
                "model_only_s": model_only, "ceiling_share": model_only / secs,
                "differs_from_tutorial": ["bf16 autocast (tutorial: fp32)"] if kind != "cache" else []}

    rows = [row("cache+logreg", "cache", seconds, 10.0, 0.9542), row("finetune", "epochs", 442.0, 500.0, None, True)]
    ratio = 442.0 / seconds
    return {**HEADER, "bench": "compare", "data": "ants", "splits": {"train": 245, "val": 153}, "arch": "resnet50",
            "weights": "w.pth", "image_size": 224, "device": "cpu", "epochs": 25, "full": False, "epochs_run": 1,
            "paths": rows, "nominal_bound": {"finetune": 55.7},
            "ratios": [{"cache": "cache+logreg", "other": "finetune", "ratio": ratio, "bound": 50.0,
                        "ratio_over_bound": ratio / 50.0, "extrapolated": True}]}


README = """# project

intro text
<!-- bench:compare -->
| old | typed | figures: 71.7x |
<!-- /bench:compare -->
between
<!-- bench:elsewhere -->
kept as is: no results file
<!-- /bench:elsewhere -->
<!-- bench:speed -->
old speed table
<!-- /bench:speed -->
end
"""


def write(tmp_path: Path, seconds: float = 13.0) -> tuple[Path, Path]:
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    (results / "compare.json").write_text(json.dumps(compare_result(seconds)))
    generic = {**HEADER, "bench": "speed", "table": {"columns": ["arch", "img/s"], "rows": [["resnet50", 72.7]]},
               "notes": ["best of 3"]}
    (results / "speed.json").write_text(json.dumps(generic))
    (results / "old.json").write_text(json.dumps({"paths": []}))  # not a bench results file: ignored
    readme = tmp_path / "README.md"
    if not readme.exists():
        readme.write_text(README)
    return readme, results


def test_blocks_are_replaced_from_results_and_the_rest_is_untouched(tmp_path):
    readme, results = write(tmp_path)
    assert report.main(["--readme", str(readme), "--results", str(results), "--check"]) == 1
    assert report.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert "71.7x" not in text and "old speed table" not in text
    assert "34.0x (extrapolated)" in text and "50.0x" in text and "| 0.68 |" in text  # 442/13, bound, ratio/bound
    assert "EXTRAPOLATED" in text and "95.42%" in text and "not a full run" in text
    assert "Test CPU, 2 cores" in text and "0.10/0.20/0.30 before" in text and "0.40/0.50/0.60 after" in text
    assert "python bench/compare.py --data d --full" in text
    assert "| resnet50 | 72.7 |" in text and "* best of 3" in text  # the generic renderer
    speed = text[text.index("<!-- bench:speed -->"):]
    assert "Test CPU, 2 cores" in speed and "commit 0123456789ab" in speed  # with its machine, like every block
    assert "kept as is: no results file" in text
    for kept in ("# project\n\nintro text\n<!-- bench:compare -->\n", "<!-- /bench:compare -->\nbetween\n",
                 "<!-- /bench:speed -->\nend\n"):
        assert kept in text


def test_regenerating_is_idempotent_and_follows_new_results(tmp_path):
    readme, results = write(tmp_path)
    report.main(["--readme", str(readme), "--results", str(results)])
    once = readme.read_text()
    report.main(["--readme", str(readme), "--results", str(results)])
    assert readme.read_text() == once
    assert report.main(["--readme", str(readme), "--results", str(results), "--check"]) == 0
    write(tmp_path, seconds=26.0)  # a new run: the block follows it, nothing else changes
    report.main(["--readme", str(readme), "--results", str(results)])
    again = readme.read_text()
    assert "17.0x (extrapolated)" in again and "34.0x" not in again
    assert again.count("<!-- bench:compare -->") == 1 and again.count("<!-- /bench:compare -->") == 1
    assert len(again.splitlines()) == len(once.splitlines())


def test_loaded_machine_is_said_in_the_table(tmp_path):
    result = compare_result(13.0)
    assert "Other jobs loaded the machine" not in report.render(result)
    result["load_after"] = [2.0, 1.0, 0.5]  # the bench's own 2 threads on 2 cores: not other jobs
    assert "Other jobs loaded the machine" not in report.render(result)
    result["load_after"] = [3.5, 1.0, 0.5]  # more than its threads explain, after a quiet start: said, not blamed
    assert "Other jobs loaded the machine" not in report.render(result)
    assert "The load after the run exceeds the cores" in report.render(result)
    result["load_before"] = [9.0, 5.0, 3.0]
    assert "Other jobs loaded the machine" in report.render(result)


def test_a_bench_that_waited_for_quiet_says_each_runs_starting_load():
    """--wait-load gates every timed run: the load before the whole bench is not what the runs met."""
    result = {**compare_result(13.0), "load_before": [1.9, 1.5, 1.2], "wait_load": 1.3,
              "rows": [{"loads_at_start": [0.95, 1.2]}, {"loads_at_start": [1.1]}]}
    assert "Each timed run started once the 1-minute load average was below 1.3 (0.95-1.20" in report.render(result)
    assert "Other jobs loaded the machine" not in report.render(result)
    result["rows"][1]["loads_at_start"] = [1.6]  # a run that started above the gate (it gave up waiting): said as loaded
    assert "Other jobs loaded the machine" in report.render(result)


def test_the_table_says_whether_the_cpu_had_native_bf16():
    """CPUs of one model name differ in bf16 (native or emulated, ~7x slower): a results file that records it says so;
    an older file without it renders as before."""
    import common

    result = compare_result(13.0)
    assert "bf16 native" not in report.render(result) and "Test CPU," in report.render(result)
    result["machine"] = {**result["machine"], "cpu_bf16": "native (avx512_bf16)"}
    assert "on Test CPU (bf16 native (avx512_bf16))," in report.render(result)
    assert common.cpu_bf16().split()[0] in {"native", "emulated", "unknown"}


def test_blocks_are_filled_in_whichever_document_holds_them(tmp_path, capsys):
    readme, results = write(tmp_path)
    readme.write_text("# project\n\nno blocks here, see docs\n")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(README)
    assert report.main(["--doc", str(readme), "--doc", str(doc), "--results", str(results)]) == 0
    assert readme.read_text() == "# project\n\nno blocks here, see docs\n"
    assert "34.0x (extrapolated)" in doc.read_text()
    assert report.main(["--doc", str(readme), "--doc", str(doc), "--results", str(results), "--check"]) == 0
    doc.write_text("# moved away\n")  # a results file with no block anywhere is said
    capsys.readouterr()
    report.main(["--doc", str(readme), "--doc", str(doc), "--results", str(results)])
    assert "compare: results file with no <!-- bench:compare --> block in any document" in capsys.readouterr().out


def test_the_device_check_renders_its_rates_and_says_what_it_did_not_measure():
    result = {**HEADER, "bench": "device_check", "command": "python bench/device_check.py",
              "rates": {"ceiling_img_s": 12000.0, "cpu_decode_img_s": 1300.0, "device_decode_img_s": 6700.0,
                        "command_cpu_decode": {"loop_img_s": 1200.0, "fixed_s": 2.9},
                        "command_gpu_decode": {"error": "CUDA out of memory"}},
              "finetune": {"finetune_img_s": 900.0, "ceiling_img_s": 1000.0, "ratio": 0.9},
              "views_photos": {"images": 398, "max_grey": 3.0, "mean_grey": 0.2, "codes_rel_diff_max": 2e-3},
              "targets": {"suite green": True, "fixed cost <= 3 s (GPU)": None, "head fitted": False},
              "skipped": ["a thing"]}
    text = report.render(result)
    assert "| ceiling | 12,000 img/s |" in text and "| device decode | 6,700 img/s |" in text
    assert "| extract loop, cpu decode | 1,200 img/s, fixed cost 2.9 s |" in text
    assert "| extract, gpu decode | failed: CUDA out of memory |" in text
    assert "(0.90)" in text and "grey levels max 3, mean 0.200" in text
    assert "| suite green | yes |" in text and "| fixed cost <= 3 s (GPU) | not measured |" in text
    assert "| head fitted | **no** |" in text and "* skipped: a thing" in text
