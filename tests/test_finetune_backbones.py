"""`finetune` beyond ResNet: any classifier replaced, --freeze by the arch's own stages, predict/export of the run,
TF32 off in the backward pass for fp32."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torchvision
from conftest import write_folder

from cnncodes import backbones, classifier, data
from cnncodes.errors import CnnCodesError
from cnncodes.finetune import TrainStep, finetune
from cnncodes.finetune.model import build_model, build_optimizer, freeze_order

FAST = {"weights": "none", "image_size": 32, "batch_size": 8, "workers": 0, "progress": False, "echo": lambda _: None}
CPU = torch.device("cpu")


def _val_images(folder, prep: data.Preprocessing) -> torch.Tensor:
    files = data.discover(folder).splits["val"]
    views = [prep.eval_view(prep.load(folder / f.path)) for f in files]
    return data.Normalize(prep.mean, prep.std, False)(torch.stack(views))


def test_mobilenet_v3_finetune_predict_and_the_saved_model_round_trip(tmp_path, cli):
    folder = write_folder(tmp_path / "data", {"train": 4, "val": 2})
    result = finetune(folder, tmp_path / "run", arch="mobilenet_v3_small", epochs=1, lr=0.01, **FAST)
    state = torch.load(result.model_path, weights_only=True)
    assert state["classifier.3.weight"].shape == (2, 1024)  # the last Linear replaced, the hidden one kept
    # model.pt is a plain state_dict of the arch: torchvision loads it strictly, and cnncodes rebuilds the same model
    plain = torchvision.models.mobilenet_v3_small(num_classes=2).eval()
    plain.load_state_dict(state, strict=True)
    model, meta = classifier.load_classifier(result.model_path)
    x = _val_images(folder, classifier.meta_preprocessing(meta))
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
        acc = (model(x).argmax(1) == torch.tensor([0, 0, 1, 1])).float().mean().item()
    assert acc == pytest.approx(result.final["val_acc"])
    proc = cli("predict", result.run_dir, folder / "val", "--workers", "0", "--device", "cpu")
    match = re.search(r"^accuracy ([0-9.]+) \((\d+)/(\d+) labelled images\)", proc.stdout, re.MULTILINE)
    assert match, proc.stdout
    assert int(match[3]) == 4 and int(match[2]) / 4 == pytest.approx(result.final["val_acc"])


def test_head_lr_multiplier_applies_to_the_new_classifier():
    model, _, _, head = build_model("mobilenet_v3_small", "none", 3, (), CPU, False)
    assert head == "classifier.3"
    opt = build_optimizer(model, "sgd", 0.01, 10.0, 0.0, head)
    body, new = opt.param_groups
    assert new["lr"] == pytest.approx(0.1) and body["lr"] == pytest.approx(0.01)
    assert {id(p) for p in new["params"]} == {id(p) for p in model.classifier[3].parameters()}
    assert any(p is model.classifier[0].weight for p in body["params"])  # the hidden Linear is pretrained body


def test_densenet_frozen_stages_keep_weights_and_batchnorm_stats(tmp_path):
    folder = write_folder(tmp_path / "data", {"train": 4, "val": 1})
    freeze = "features.denseblock1,features.conv0,features.norm0"
    result = finetune(folder, tmp_path / "run", arch="densenet121", epochs=1, lr=0.05, freeze=freeze, **FAST)
    assert result.history and freeze_order("densenet121", freeze.split(",")) == (
        "features.conv0", "features.norm0", "features.denseblock1")  # network order
    before = backbones.create_backbone("densenet121", "none", num_classes=2).model.state_dict()
    after = torch.load(result.model_path, weights_only=True)
    frozen = [k for k in before if k.startswith(("features.conv0.", "features.norm0.", "features.denseblock1."))]
    assert any("running_mean" in k for k in frozen) and any("num_batches_tracked" in k for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    for k in ("features.transition1.norm.running_mean", "features.denseblock4.denselayer16.conv2.weight",
              "features.norm5.running_var", "classifier.weight"):
        assert not torch.equal(before[k], after[k]), f"trainable {k} did not change"


def test_freeze_takes_parameter_prefixes_and_refuses_the_classifier():
    assert freeze_order("mobilenet_v3_small", ["features.1", "features.0.0"]) == ("features.0.0", "features.1")
    assert freeze_order("resnet18", ["layer2", "stem", "layer1.0.conv1"]) == ("stem", "layer1.0.conv1", "layer2")
    with pytest.raises(CnnCodesError, match=r"unknown stage\(s\) classifier.3 .*features.0,features.1"):
        freeze_order("mobilenet_v3_small", ["classifier.3"])
    with pytest.raises(CnnCodesError, match=r"unknown stage\(s\) layer5 for resnet18; choose among stem,conv1,bn1,layer1"):
        freeze_order("resnet18", ["layer5"])


def test_bad_freeze_name_is_one_line_listing_the_valid_ones(tmp_path, cli):
    folder = write_folder(tmp_path / "data", {"": 2})
    proc = cli("finetune", folder, "-o", tmp_path / "run", "--arch", "mobilenet_v3_small", "--weights", "none",
               "--image-size", "32", "--workers", "0", "-q", "--freeze", "layer1", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "layer1" in lines[0] and "features.0,features.1," in lines[0] and "features.12" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before the run folder is touched


def test_timm_model_finetunes_with_its_stem_frozen(tmp_path):
    pytest.importorskip("timm")
    folder = write_folder(tmp_path / "data", {"train": 4, "val": 1})
    result = finetune(folder, tmp_path / "run", arch="timm:resnet10t", epochs=1, lr=0.05, freeze="stem", **FAST)
    before = backbones.create_backbone("timm:resnet10t", "none", num_classes=2).model.state_dict()
    after = torch.load(result.model_path, weights_only=True)
    stem = [k for k in before if k.startswith(("conv1.", "bn1."))]
    assert stem and all(torch.equal(before[k], after[k]) for k in stem)
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    model, meta = classifier.load_classifier(result.model_path)
    assert meta["arch"] == "timm:resnet10t" and model.fc.out_features == 2


class _RecordTF32(torch.nn.Module):
    """A linear layer that records the TF32 flags in its forward and backward passes."""

    def __init__(self):
        super().__init__()
        self.fc, self.seen = torch.nn.Linear(3 * 4 * 4, 2), {}

    def forward(self, x):
        self.seen["forward"] = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        y = self.fc(x.flatten(1))
        y.register_hook(lambda g: self.seen.__setitem__(
            "backward", (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)))
        return y


def test_fp32_training_step_runs_without_tf32_in_forward_and_backward():
    model = _RecordTF32()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, torch.nn.Identity(), opt, torch.amp.GradScaler("cuda", enabled=False), CPU, "fp32",
                     torch.nn.functional.cross_entropy)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        step(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
        assert model.seen == {"forward": (False, False), "backward": (False, False)}
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored after
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_preprocess_like_gives_a_weights_file_the_named_weights_preprocessing(tmp_path):
    folder = write_folder(tmp_path / "data", {"train": 2, "val": 1})
    fast = {**FAST, "image_size": 64, "epochs": 0}  # epochs 0: the run resolves and records, no training
    default = finetune(folder, tmp_path / "default", arch="resnet50", **fast)
    like = finetune(folder, tmp_path / "like", arch="resnet50", preprocess_like="IMAGENET1K_V1", **fast)
    resize = [json.loads(r.log_json.read_text())["recipe"]["preprocessing"]["resize"] for r in (default, like)]
    assert resize == [round(64 * 232 / 224), round(64 * 256 / 224)]  # DEFAULT (V2)'s ratio, then V1's
    with pytest.raises(CnnCodesError, match="--preprocess-like applies to --weights FILE or none"):
        finetune(folder, tmp_path / "named", arch="resnet50", preprocess_like="IMAGENET1K_V1",
                 **{**fast, "weights": "IMAGENET1K_V2"})
