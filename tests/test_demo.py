"""The quickstart's main job: the embedded digits dataset and `cnncodes demo`."""

from __future__ import annotations

from cnncodes.data import discover
from cnncodes.demo import write_digits


def test_digits_folder_is_a_real_image_folder(tmp_path):
    root = write_digits(tmp_path / "digits")
    layout = discover(root)
    assert layout.classes == [str(d) for d in range(10)]
    assert len(layout.splits["train"]) == 1437 and len(layout.splits["val"]) == 360
    assert write_digits(root) == root  # idempotent


def test_demo_runs_end_to_end_offline(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached weights: offline fallback path
    r = cli("demo", "--dir", tmp_path / "demo", "--weights", "none", "--image-size", "32")
    assert "val accuracy" in r.stdout and (tmp_path / "demo" / "digits-resnet18-logreg.h5").is_file()
    accuracy = float(r.stdout.split("val accuracy ")[1].split()[0])
    assert accuracy > 0.5  # 10 classes: far above chance even with random weights


def test_demo_refuses_a_misspelt_arch_or_a_bad_size_before_any_work(tmp_path, cli):
    for args, message in [(("--arch", "resnett18"), "unknown arch 'resnett18'; nearest: resnet18"),
                          (("--image-size", "-1"), "--image-size must be >= 32")]:
        r = cli("demo", "--dir", tmp_path / "demo", "--weights", "none", *args, check=False)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "continuing with --weights none" not in r.stdout and not (tmp_path / "demo").exists()
