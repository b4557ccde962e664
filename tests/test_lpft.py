"""LP-FT (`finetune --init-head`): the run starts where the fit-head head is; heads that do not fit are refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_folder

from cnncodes.errors import CnnCodesError
from cnncodes.extract import extract
from cnncodes.finetune import FinetuneConfig, finetune
from cnncodes.finetune.config import FRESH_HEAD_LR_MULT, INIT_HEAD_LR_MULT
from cnncodes.heads import LinearHead, fit_head
from cnncodes.predict import predict
from cnncodes.store import Cache

SIZE = 32
FAST = {"arch": "resnet18", "weights": "none", "image_size": SIZE, "batch_size": 8, "workers": 0, "progress": False}
FAST_CLI = ("--weights", "none", "--image-size", str(SIZE), "--batch-size", "8", "--workers", "0", "-q")
CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    """Three generated classes, their resnet18 (random weights) cache at 32 px, a logreg and an svm head."""
    root = tmp_path_factory.mktemp("lpft")
    data = write_folder(root / "data", {"train": 6, "val": 5}, classes=CLASSES)
    cache = root / "codes.h5"
    extract(data, cache, arch="resnet18", weights="none", image_size=SIZE, views=1, eval_views=1, workers=0,
            precision="fp32", progress=False, log=lambda m: None)
    out = {"root": root, "data": data, "cache": cache}
    for clf in ("logreg", "svm"):
        head, report = fit_head(cache, clf, "auto")
        head.save(root / f"{clf}.h5")
        out[clf] = {"path": root / f"{clf}.h5", "head": head, "val_acc": report["splits"]["val"]["accuracy"]}
    return out


def _val_codes(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """The plain-view val codes and labels, as fit-head's report scores them."""
    with Cache(cache) as c:
        x, y, views = c.features("val")[()], c.labels("val"), c.views("val")
    return x[views == 0], y[views == 0]


def test_epoch0_is_the_heads_own_val_accuracy_and_loss(probe, tmp_path):
    head = probe["logreg"]
    res = finetune(probe["data"], tmp_path / "run", init_head=str(head["path"]), epochs=1, echo=lambda _: None, **FAST)
    first = res.history[0]
    assert [h["epoch"] for h in res.history] == [0, 1] and first["train_images"] == 0
    assert first["val_images"] == 5 * len(CLASSES)
    assert first["val_acc"] == head["val_acc"]  # same images, same preprocessing: the same decisions
    x, y = _val_codes(probe["cache"])
    scores = head["head"].decision_function(x)
    log_p = scores - scores.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    assert first["val_loss"] == pytest.approx(-log_p[np.arange(len(y)), y].mean(), rel=1e-3, abs=1e-4)
    recipe = json.loads(res.log_json.read_text())["recipe"]
    assert recipe["init_head"].startswith("sha256:") and recipe["head_lr_mult"] == INIT_HEAD_LR_MULT
    assert res.log_csv.read_text().splitlines()[1].startswith("0,")  # epoch 0 is logged


def test_epochs_0_saves_the_head_as_a_classifier_that_predicts_like_it(probe, tmp_path):
    head = probe["logreg"]["path"]
    proc = run_cli("finetune", probe["data"], "-o", tmp_path / "run", *FAST_CLI, "--epochs", "0",
                   "--init-head", head)
    assert "epoch 0/0 (initial model, before any step)" in proc.stdout
    val = [probe["data"] / "val"]
    from_head = predict(head, val, device="cpu", workers=0, precision="fp32")
    for model in (tmp_path / "run", tmp_path / "run" / "model.pt"):
        from_run = predict(model, val, device="cpu", workers=0, precision="fp32")
        assert [r["path"] for r in from_run.rows] == [r["path"] for r in from_head.rows]
        assert [r["pred"] for r in from_run.rows] == [r["pred"] for r in from_head.rows]
        np.testing.assert_allclose([r["score"] for r in from_run.rows], [r["score"] for r in from_head.rows],
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(from_run.scores, from_head.scores, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", ["arch", "classes", "image_size", "layers"])
def test_a_head_that_does_not_fit_the_run_is_one_clear_line(probe, tmp_path, case):
    data, args, head = probe["data"], list(FAST_CLI), probe["logreg"]["path"]
    if case == "layers":  # a head on intermediate-layer codes (as `extract --layer layer3` then fit-head records it)
        h = probe["logreg"]["head"]
        head = tmp_path / "layer3.h5"
        dataclasses.replace(h, meta={**h.meta, "layers": "layer3"}).save(head)
    if case == "arch":
        args += ["--arch", "resnet34"]
    elif case == "classes":
        data = write_folder(tmp_path / "other", {"train": 2, "val": 1}, classes=("cat", "dog", "fox"))
    else:
        args[args.index("--image-size") + 1] = "48"
    run = tmp_path / "run"
    proc = run_cli("finetune", data, "-o", run, *args, "--init-head", head, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and str(head) in lines[0]
    expected = {"arch": "arch: head resnet18, run resnet34", "classes": "data has fox not in the head; head has owl",
                "image_size": f"pass --image-size {SIZE}", "layers": "fitted on intermediate layers (layer3)"}[case]
    assert expected in lines[0]
    assert not (run / "checkpoint.pt").exists()


def test_any_clf_starts_the_run_and_resume_refuses_another_head(probe, tmp_path):
    svm, run = probe["svm"], tmp_path / "run"
    res = finetune(probe["data"], run, init_head=str(svm["path"]), epochs=1, echo=lambda _: None, **FAST)
    assert res.history[0]["val_acc"] == svm["val_acc"]
    with pytest.raises(CnnCodesError, match=r"different settings.*init_head"):
        finetune(probe["data"], run, init_head=str(probe["logreg"]["path"]), epochs=2, resume=True,
                 echo=lambda _: None, **FAST)
    with pytest.raises(CnnCodesError, match=r"different settings.*init_head"):
        finetune(probe["data"], run, epochs=2, resume=True, echo=lambda _: None, **FAST)
    again = finetune(probe["data"], run, init_head=str(svm["path"]), epochs=1, resume=True, echo=lambda _: None, **FAST)
    assert again.resumed_from_epoch == 1 and [h["epoch"] for h in again.history] == [0, 1]


def test_head_lr_mult_defaults_lower_for_a_trained_head_unless_given():
    assert FinetuneConfig().resolved_head_lr_mult == FRESH_HEAD_LR_MULT
    assert FinetuneConfig(init_head="h.h5").resolved_head_lr_mult == INIT_HEAD_LR_MULT <= 1.0
    assert FinetuneConfig(init_head="h.h5", head_lr_mult=10.0).resolved_head_lr_mult == 10.0
    config = dataclasses.replace(FinetuneConfig(init_head="h.h5"), epochs=0)  # 0 epochs: the model as is
    assert config.recipe("none", ["a", "b"], {}, 1, "sha256:x").init_head == "sha256:x"
    with pytest.raises(CnnCodesError, match="--epochs must be >= 0"):
        FinetuneConfig(epochs=-1)


def test_folded_head_weights_are_the_classifier(probe):
    """The fold W' = coef / scale, b' = intercept - W' @ mean gives the head's scores on raw codes."""
    from cnncodes.backbones import default_preprocessing, resolve_weights
    from cnncodes.data import Preprocessing
    from cnncodes.finetune.lpft import load_init_head

    head: LinearHead = probe["logreg"]["head"]
    prep = Preprocessing.for_image_size(SIZE, default_preprocessing("resnet18", resolve_weights("resnet18", "none")))
    reversed_classes = list(reversed(CLASSES))  # rows follow the run's class order
    init = load_init_head(probe["logreg"]["path"], "resnet18", "none:seed0", prep, reversed_classes)
    x, _ = _val_codes(probe["cache"])
    np.testing.assert_allclose(x @ init.weight.T + init.bias, head.decision_function(x)[:, ::-1], rtol=1e-6, atol=1e-6)


def test_compare_lpft_path_counts_the_cache_head_and_reports_its_epochs(probe, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import compare

    args = compare.parse_args(["--data", str(probe["data"]), "--weights", "none", "--epochs", "1", "--full",
                               "--repeats", "1", "--image-size", str(SIZE), "--precision", "fp32", "--lpft"])
    assert [p.name for p in compare.selected_paths(args)][:3] == ["cache", "finetune", "lpft"]
    ctx = compare.context(args, tmp_path)
    ctx.outputs["cache"] = {"heads": {"logreg": probe["logreg"]["head"]}, "seconds": {"logreg": 1000.0},
                            "forward": 33}
    row = compare.LPFTPath().run_once(ctx, tmp_path / "lpft")["lpft"]
    assert row.seconds > 1000.0 and row.parts["cache_head_s"] == 1000.0  # the head's time is in the total
    assert row.epochs_run == 1 and not row.extrapolated and row.val_acc is not None  # final epoch 1, not epoch 0
    assert row.extra["epoch0_val_acc"] == probe["logreg"]["val_acc"]
    assert row.work.train == 6 * len(CLASSES) and row.work.forward == 33 + 2 * 5 * len(CLASSES)
