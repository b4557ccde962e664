"""`finetune`: learning, frozen stages, exact resume after kill -9, saved model, torchrun DDP, bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import write_folder

from cnncodes import backbones, classifier, data, runtime
from cnncodes.errors import CnnCodesError
from cnncodes.cli.finetune_cmd import finetune_command
from cnncodes.finetune import FinetuneConfig, finetune

FAST = {"arch": "resnet18", "weights": "none", "image_size": 32, "batch_size": 8, "workers": 0, "progress": False}
FAST_CLI = ("--weights", "none", "--image-size", "32", "--batch-size", "8", "--workers", "0", "-q")


def _lines() -> tuple[list[str], callable]:
    lines: list[str] = []
    return lines, lines.append


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 3-epoch AdamW run on 2 learnable classes, with 2 unreadable training files."""
    root = tmp_path_factory.mktemp("ft")
    folder = write_folder(root / "data", {"train": 8, "val": 4})
    (folder / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "train" / "dog" / "empty.png").write_bytes(b"")
    lines, echo = _lines()
    result = finetune(folder, root / "run", epochs=3, optimizer="adamw", lr=1e-3, select_best_on_val=True,
                      deterministic=True, echo=echo, **FAST)
    return result, lines, folder


def test_loss_decreases_and_logs_every_epoch(trained):
    result, lines, _ = trained
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.final == result.history[-1] and result.final["epoch"] == 3 and result.has_val
    with open(result.log_csv) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "epoch_time_s"} <= set(rows[0])
    log = json.loads(result.log_json.read_text())
    assert log["finished"] and [e["epoch"] for e in log["epochs"]] == [1, 2, 3]
    assert result.curves_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 3 and "val loss" in epoch_lines[0] and "img/s" in epoch_lines[0]


def test_unreadable_files_are_skipped_counted_and_reported(trained):
    result, lines, _ = trained
    assert set(result.skipped) == {"train/cat/broken.jpg", "train/dog/empty.png"}
    assert all(h["skipped_files"] == 2 and h["train_images"] == 16 for h in result.history)
    assert sum(line.startswith("skipped train/") for line in lines) == 2  # each reported once, not per epoch
    assert json.loads(result.log_json.read_text())["skipped_files"]["train/dog/empty.png"].startswith("empty file")


def test_final_epoch_is_reported_and_best_on_val_is_labelled_optimistic(trained):
    result, lines, _ = trained
    final = next(line for line in lines if line.startswith("final model"))
    assert "epoch 3/3" in final and str(result.model_path) in final
    optimistic = [line for line in lines if "OPTIMISTIC" in line]
    assert len(optimistic) == 1 and optimistic[0].startswith("OPTIMISTIC: chosen on the validation split")
    assert result.best_on_val["epoch"] in (1, 2, 3) and result.best_model_path.is_file()
    _, meta = classifier.load_classifier(result.best_model_path)
    assert "OPTIMISTIC" in meta["source"]["selected"]


def test_checkpoint_is_plain_tensors(trained):
    result, _, _ = trained
    ckpt = torch.load(result.checkpoint_path, map_location="cpu", weights_only=True)  # no pickled objects
    assert ckpt["epoch"] == 3 and {"model", "optimizer", "scheduler", "rng", "history"} <= set(ckpt)
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor) and ckpt["scheduler"]["last_epoch"] == 3


def _accuracy(model: torch.nn.Module, prep: data.Preprocessing, folder: Path, split: str) -> float:
    layout = data.discover(folder)
    files = layout.splits[split]
    images = torch.stack([prep.eval_view(prep.load(folder / f.path)) for f in files])
    with torch.no_grad():
        logits = model.eval()(data.Normalize(prep.mean, prep.std, channels_last=False)(images))
    labels = torch.tensor([f.label for f in files])
    return (logits.argmax(1) == labels).float().mean().item()


def test_saved_model_loads_strictly_and_reproduces_eval_accuracy(trained):
    result, _, folder = trained
    plain = torchvision.models.resnet18(num_classes=2)
    plain.load_state_dict(torch.load(result.model_path, weights_only=True), strict=True)
    model, meta = classifier.load_classifier(result.model_path)
    assert meta["arch"] == "resnet18" and meta["classes"] == ["cat", "dog"] and meta["source"]["command"] == "finetune"
    prep = classifier.meta_preprocessing(meta)
    assert prep.crop == 32
    assert _accuracy(model, prep, folder, "val") == pytest.approx(result.final["val_acc"])


def test_cnncodes_predict_reproduces_eval_accuracy(trained, cli):
    result, _, folder = trained
    proc = cli("predict", result.model_path, folder / "val", "--workers", "0", "--device", "cpu")
    match = re.search(r"^accuracy ([0-9.]+) \((\d+)/(\d+) labelled images\)", proc.stdout, re.MULTILINE)
    assert match, proc.stdout
    correct, images = int(match[2]), int(match[3])
    assert images == result.final["val_images"] == 8
    assert correct / images == pytest.approx(result.final["val_acc"])


def test_frozen_stages_keep_weights_and_batchnorm_stats(tmp_path):
    folder = write_folder(tmp_path / "data", {"train": 4, "val": 1})
    result = finetune(folder, tmp_path / "run", epochs=1, lr=0.05, freeze="stem,layer1,layer2", precision="bf16",
                      echo=lambda _: None, **FAST)
    before, _ = backbones.create_model("resnet18", "none", num_classes=2)
    before = before.state_dict()
    after = torch.load(result.model_path, weights_only=True)
    frozen = [k for k in before if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")]
    assert any("running_mean" in k for k in frozen) and any("num_batches_tracked" in k for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    for k in ("layer3.0.conv1.weight", "layer3.0.bn1.running_mean", "layer4.1.bn2.running_var", "fc.weight"):
        assert not torch.equal(before[k], after[k]), f"trainable {k} did not change"


def _cli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "cnncodes", "finetune", *map(str, args)]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared:\n{proc.communicate()}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


def test_resume_after_kill_9_gives_bitwise_identical_weights(tmp_path, cli):
    folder = write_folder(tmp_path / "data", {"train": 12, "val": 2})
    args = (folder, *FAST_CLI, "--epochs", "4", "--deterministic", "--seed", "7", "--optimizer", "sgd", "--lr", "0.01")
    cli("finetune", *args, "-o", tmp_path / "ref")

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli_cmd(*args, "-o", run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        _wait_for(run / "checkpoint.pt", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert not (run / "model.pt").exists(), "the run finished before it could be killed"
    killed_at = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= killed_at < 4

    again = cli("finetune", *args, "-o", run, check=False)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "--resume" in again.stderr and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    resumed = cli("finetune", *args, "-o", run, "--resume", subprocess_=True)  # a new process, as after a crash
    assert f"resuming {run} after epoch {killed_at}/4" in resumed.stdout
    ref, got = torch.load(tmp_path / "ref" / "model.pt", weights_only=True), torch.load(run / "model.pt", weights_only=True)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k} differs after resume"
    with open(run / "log.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_ctrl_c_exits_130_with_resume_hint(tmp_path):
    folder = write_folder(tmp_path / "data", {"train": 12, "val": 2})
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli_cmd(folder, *FAST_CLI, "--epochs", "50", "-o", run), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_for(run / "checkpoint.pt", proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # (once seen in CI at exit 1, not reproduced in 6 runs since: the message says where the signal landed)
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err, (proc.returncode, err[-2000:])


def test_torchrun_two_processes_split_the_data_and_write_once(tmp_path):
    folder = write_folder(tmp_path / "data", {"train": 8, "val": 3})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cnncodes", "finetune", folder, "-o", run, *FAST_CLI, "--epochs", "1", "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(list(map(str, cmd)), check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert sum(line.startswith("epoch 1/1") for line in out) == 1  # rank 0 talks, the other rank is quiet
    assert sum(line.startswith("final model") for line in out) == 1
    files = sorted(p.name for p in run.iterdir())
    assert files == ["checkpoint.pt", "curves.png", "log.csv", "log.json", "model.json", "model.pt", "run.lock"]
    epoch = json.loads((run / "log.json").read_text())["epochs"][0]
    assert epoch["train_samples_per_rank"] == [8, 8]  # each rank saw half of the 16 training images...
    assert epoch["train_samples_distinct"] == 16  # ...and together all of them, once
    assert epoch["val_images"] == 6  # val metrics summed over both ranks' shards
    assert json.loads((run / "log.json").read_text())["recipe"]["world_size"] == 2
    classifier.load_classifier(run / "model.pt")


def test_no_val_split_reports_train_metrics_only(tmp_path):
    folder = write_folder(tmp_path / "data", {"": 4})
    lines, echo = _lines()
    result = finetune(folder, tmp_path / "run", epochs=1, echo=echo, **FAST)
    assert not result.has_val and result.final["val_acc"] is None
    assert any(line.startswith("no val split: train metrics only") for line in lines)
    with pytest.raises(CnnCodesError, match="needs a val split"):
        finetune(folder, tmp_path / "run2", epochs=1, select_best_on_val=True, echo=echo, **FAST)


def test_run_folder_is_locked_and_resume_checks_settings(tmp_path):
    folder = write_folder(tmp_path / "data", {"": 3})
    run = tmp_path / "run"
    with runtime.FileLock(run / "run", "run"), pytest.raises(CnnCodesError, match="in use by another cnncodes"):
        finetune(folder, run, epochs=1, echo=lambda _: None, **FAST)
    lines, echo = _lines()
    finetune(folder, run, epochs=1, resume=True, echo=echo, **FAST)  # nothing to resume yet: says so, starts
    assert f"note: --resume: no checkpoint.pt in {run} yet; starting the run from epoch 0" in lines
    with pytest.raises(CnnCodesError, match=r"different settings.*lr"):
        finetune(folder, run, epochs=2, lr=0.1, resume=True, echo=lambda _: None, **FAST)
    result = finetune(folder, run, epochs=2, resume=True, echo=lambda _: None, **FAST)  # more epochs extend the run
    assert result.resumed_from_epoch == 1 and [h["epoch"] for h in result.history] == [1, 2]
    with pytest.raises(CnnCodesError, match="unknown stage"):
        finetune(folder, run, freeze="layer5", echo=lambda _: None, **FAST)


@pytest.mark.parametrize("case", ["empty", "missing", "file", "one_class"])
def test_bad_input_is_one_clear_line(tmp_path, cli, case):
    target = tmp_path / "data"
    if case == "empty":
        target.mkdir()
    elif case == "file":
        target.write_text("not a folder")
    elif case == "one_class":
        write_folder(target, {"": 2}, classes=("cat",))
    proc = cli("finetune", target, "-o", tmp_path / "run", *FAST_CLI, check=False, subprocess_=case == "missing")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0]


def test_config_is_validated_once_and_overrides_are_its_fields(tmp_path):
    config = FinetuneConfig(freeze="layer2, stem", epochs=3)
    assert config.freeze == ("stem", "layer2")  # network order, whatever the input order
    with pytest.raises(CnnCodesError, match=r"^--lr must be > 0$"):
        dataclasses.replace(config, lr=0)
    with pytest.raises(CnnCodesError, match="unknown optimizer 'adam'"):
        FinetuneConfig(optimizer="adam")
    with pytest.raises(TypeError, match="learning_rate"):
        finetune(tmp_path, tmp_path / "run", config, learning_rate=0.1)
    recipe = config.recipe("none", ["cat", "dog"], {"crop": 32}, world_size=2)
    assert (recipe.epochs, recipe.freeze, recipe.lr, recipe.world_size) == (3, ("stem", "layer2"), 1e-3, 2)


def test_a_config_passed_whole_trains_like_keywords(tmp_path):
    folder = write_folder(tmp_path / "data", {"": 3})
    config = FinetuneConfig(arch="resnet18", weights="none", image_size=32, batch_size=8, workers=0, epochs=1,
                            deterministic=True, seed=3)
    whole = finetune(folder, tmp_path / "whole", config, progress=False, echo=lambda _: None)
    keywords = finetune(folder, tmp_path / "keywords", epochs=1, deterministic=True, seed=3, echo=lambda _: None,
                        **FAST)
    a, b = torch.load(whole.model_path, weights_only=True), torch.load(keywords.model_path, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(whole.log_json.read_text())["recipe"] == json.loads(keywords.log_json.read_text())["recipe"]


def test_cli_options_and_defaults_are_the_config_fields():
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    defaults = {p.name: p.default for p in finetune_command.params if p.name in names}
    assert set(defaults) == names  # every recipe option has a flag
    assert FinetuneConfig(**defaults) == FinetuneConfig()  # and the flag's default is the config's


def test_cli_flags_parse_into_the_config():
    args = ["data", "-o", "run", "--freeze", "layer1,stem", "--image-size", "64", "--optimizer", "adamw",
            "--lr", "0.01", "--epochs", "3", "--deterministic", "--no-channels-last", "--select-best-on-val"]
    params = finetune_command.make_context("finetune", args).params
    # What the command takes besides the recipe: where the data is, the run folder, and how to read a manifest.
    steering = ("data", "run_dir", "resume", "overwrite", "quiet", "path_col", "label_col", "val_fraction")
    config = FinetuneConfig(**{k: v for k, v in params.items() if k not in steering})
    assert config == FinetuneConfig(freeze=("stem", "layer1"), image_size=64, optimizer="adamw", lr=0.01, epochs=3,
                                    deterministic=True, channels_last=False, select_best_on_val=True)
