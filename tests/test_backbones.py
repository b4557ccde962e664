"""Backbones: every torchvision family and timm behind one head API; weights that never run code."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import HYMENOPTERA, RESNET50_KERAS, SHARED, write_folder
from torch import nn

from cnncodes import backbones as B
from cnncodes.errors import CnnCodesError
from cnncodes.extract import extract
from cnncodes.heads import LinearHead, fit_head
from cnncodes.predict import export_head, predict
from cnncodes.store import Cache

QUIET = dict(progress=False, log=lambda m: None, workers=0)
# One model of every torchvision family: (arch, code dim = the input of its final classification layer)
FAMILIES = [
    ("alexnet", 4096), ("vgg11", 4096), ("squeezenet1_0", 512), ("densenet121", 1024), ("googlenet", 1024),
    ("inception_v3", 2048), ("mobilenet_v2", 1280), ("mobilenet_v3_small", 1024), ("mnasnet0_5", 1280),
    ("shufflenet_v2_x0_5", 1024), ("efficientnet_b0", 1280), ("regnet_x_400mf", 400), ("resnet18", 512),
    ("convnext_tiny", 768), ("vit_b_16", 768), ("swin_t", 768), ("maxvit_t", 512),
    ("timm:resnet10t", 512), ("timm:efficientnet_b0", 1280),  # timm: BatchNormAct2d (BN + activation in one)
]
# BatchNorm layers that follow no convolution, so folding must leave them: DenseNet's pre-activation
# norm1 of each of its 58 dense layers, the 3 transitions' norm and norm5; MaxViT's MBConv pre-norm
# in each of its 11 blocks. Every other BatchNorm follows a conv and must be folded away.
UNFOLDABLE_BN = {"densenet121": 58 + 3 + 1, "maxvit_t": 11}


def _input_size(bb: B.Backbone) -> int:
    if bb.fixed_size:
        return bb.fixed_size
    return 75 if bb.arch == "inception_v3" else 64  # Inception's smallest; 64 px elsewhere


def _randomise_batchnorm(model: nn.Module) -> int:
    """Non-trivial BN statistics and affine parameters, so folding has something to get wrong."""
    g = torch.Generator().manual_seed(0)
    n = 0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
            n += 1
    return n


def _count_bn(model: nn.Module) -> int:
    """Every BatchNorm, subclasses (timm's BatchNormAct2d) included: counted here, not by the code under test."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("arch,dim", FAMILIES, ids=[a for a, _ in FAMILIES])
@torch.inference_mode()
def test_code_is_the_classifier_input_and_bn_folding_is_exact(arch, dim):
    if B.is_timm(arch):
        pytest.importorskip("timm")
    bb = B.create_backbone(arch, "none")
    assert bb.num_features == dim == B.code_dim(arch)
    model = bb.model.eval()
    has_bn = _randomise_batchnorm(model) > 0
    x = torch.randn(2, 3, _input_size(bb), _input_size(bb), generator=torch.Generator().manual_seed(1))
    seen = {}
    hook = bb.classifier().register_forward_hook(lambda m, i, o: seen.setdefault("in", i[0]))
    model(x)
    hook.remove()
    expected = seen["in"]
    if isinstance(bb.classifier(), nn.Conv2d):  # SqueezeNet: pooled channels entering the final conv
        expected = expected.mean(dim=(2, 3))
    codes = bb.headless()(x)
    assert codes.shape == (2, dim)
    torch.testing.assert_close(codes, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    if has_bn:
        notes = []
        before = _count_bn(bb.model)
        fused = B.fold_batchnorm(bb.model, arch, notes.append)
        assert _count_bn(fused) == UNFOLDABLE_BN.get(arch, 0) < before, notes  # folding happened
        assert not any("skipped" in n for n in notes)
        folded = fused(x)
        scale = float(codes.abs().max())
        assert float((folded - codes).abs().max()) <= 1e-4 * scale, arch
        assert _count_bn(bb.model) == before  # the original is untouched


def test_stage_groups_and_reset_classifier():
    bb = B.create_backbone("densenet121", "none")
    groups = [g for g, _ in bb.stages()]
    assert groups[0] == "features.conv0" and groups[-1] == "classifier" and "features.denseblock4" in groups
    model = bb.reset_classifier(3)
    assert model.classifier.out_features == 3 and bb.classifier_parameters()[0].shape == (3, 1024)
    sq = B.create_backbone("squeezenet1_0", "none")
    sq.reset_classifier(2)
    assert sq.classifier().weight.shape == (2, 512, 1, 1) and isinstance(sq.model.classifier[2], nn.Identity)


def test_preprocessing_comes_from_the_weights_meta():
    none = B.WeightsInfo("none", "none")
    inc = B.resolve_preprocessing("inception_v3", B.resolve_weights("inception_v3", "DEFAULT"))
    assert (inc.resize, inc.crop, inc.interpolation) == (342, 299, "bilinear")
    eff = B.resolve_preprocessing("efficientnet_b3", none)  # none: the DEFAULT weights' preprocessing
    assert (eff.resize, eff.crop, eff.interpolation) == (320, 300, "bicubic")
    r50 = B.resolve_preprocessing("resnet50", B.resolve_weights("resnet50", "IMAGENET1K_V1"))
    assert (r50.resize, r50.crop) == (256, 224)
    assert B.resolve_preprocessing("resnet50", none).resize == 232  # DEFAULT = V2
    assert B.resolve_preprocessing("resnet18", none, 64).crop == 64
    assert B.resolve_preprocessing("resnet50", none, like="IMAGENET1K_V1").resize == 256
    assert B.resolve_preprocessing("vit_b_16", none, 224).crop == 224
    with pytest.raises(CnnCodesError, match="takes only 224x224"):
        B.resolve_preprocessing("vit_b_16", none, 160)
    view = eff.eval_view(torch.randint(0, 256, (3, 400, 500), dtype=torch.uint8))
    assert view.shape == (3, 300, 300) and view.dtype == torch.uint8


def test_unknown_arch_lists_the_nearest_names(cli, image_folder, tmp_path):
    r = cli("extract", image_folder, "-o", tmp_path / "c.h5", "--arch", "densnet121", "--weights", "none", check=False)
    assert r.returncode == 2 and "nearest: densenet121" in r.stderr and "Traceback" not in r.stderr


def test_features_only_file_loads_and_foreign_keys_are_named(tmp_path):
    full = B.create_backbone("mobilenet_v2", "none").model.state_dict()
    body = {k: v for k, v in full.items() if not k.startswith("classifier.")}
    torch.save(body, tmp_path / "features.pth")
    model, info, dim = B.create_extractor("mobilenet_v2", str(tmp_path / "features.pth"), fold_bn=False)
    assert info.kind == "file" and dim == 1280
    torch.testing.assert_close(model.features[0][0].weight, body["features.0.0.weight"])
    torch.save({**body, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(CnnCodesError, match=r"1 unexpected \(e.g. extra.weight\)"):
        B.create_backbone("mobilenet_v2", str(tmp_path / "extra.pth"))
    del body["features.0.0.weight"]
    torch.save(body, tmp_path / "missing.pth")
    with pytest.raises(CnnCodesError, match=r"1 missing \(e.g. features.0.0.weight\)"):
        B.create_backbone("mobilenet_v2", str(tmp_path / "missing.pth"))


class _Marker:
    """A pickle that touches a file when unpickled: what a planted TORCH_HOME file could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_planted_torch_home_file_never_runs(image_folder, tmp_path, cli):
    marker = tmp_path / "pwned"
    home = tmp_path / "torch"
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    with open(checkpoints / "resnet18-f37072fd.pth", "wb") as f:
        pickle.dump({"fc.weight": _Marker(str(marker))}, f)
    r = cli("extract", image_folder, "-o", tmp_path / "c.h5", "--weights", "IMAGENET1K_V1", "--image-size", "64",
            env={"TORCH_HOME": str(home)}, check=False)
    assert r.returncode == 2 and not marker.exists(), r.stderr
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "refused" in errors[0] and "resnet18-f37072fd.pth" in errors[0], r.stderr


def test_cached_hub_file_is_hash_checked_then_loaded_without_pickle(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = torchvision.models.resnet18().state_dict()
    good = tmp_path / "good.pth"
    torch.save(state, good)
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    url = f"https://example.invalid/resnet18-{digest[:8]}.pth"
    good.rename(checkpoints / f"resnet18-{digest[:8]}.pth")
    assert B._weights.hub_file(url, "w", "") == checkpoints / f"resnet18-{digest[:8]}.pth"
    with pytest.raises(CnnCodesError, match="does not start with 00000000"):
        (checkpoints / "resnet18-00000000.pth").write_bytes((checkpoints / f"resnet18-{digest[:8]}.pth").read_bytes())
        B._weights.hub_file("https://example.invalid/resnet18-00000000.pth", "w", "")
    with pytest.raises(CnnCodesError, match="offline"):
        B._weights.hub_file("http://127.0.0.1:9/resnet18-12345678.pth", "w", "")


def test_layer_codes_are_pooled_concatenated_and_recorded(image_folder, tmp_path, cli):
    out = tmp_path / "c.h5"
    extract(image_folder, out, arch="resnet18", weights="none", image_size=64, layers="layer2,layer1", **QUIET)
    with Cache(out) as c:
        assert c.feature_dim == 128 + 64 and c.config.layers == "layer2,layer1"
        x = c.features("val")[()]
    bb = B.create_backbone("resnet18", "none")
    assert x.shape[1] == 192
    assert "layer4" in B.list_layers("resnet18")
    head, _ = fit_head(out, "logreg", "auto")
    head.save(tmp_path / "h.h5")
    r = cli("predict", tmp_path / "h.h5", image_folder / "val", "--workers", "0", check=False)
    assert r.returncode == 2 and "intermediate layers" in r.stderr and "Traceback" not in r.stderr
    r = cli("archs", "resnet18", "--layers")
    assert "layer3" in r.stdout.split()
    with pytest.raises(CnnCodesError, match="no such layer"):
        extract(image_folder, tmp_path / "d.h5", arch="resnet18", weights="none", image_size=64, layers="layer9", **QUIET)
    del bb


def test_mobilenet_v3_extract_fit_predict_export_round_trip(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 6, "val": 3})
    cache = tmp_path / "c.h5"
    extract(data, cache, arch="mobilenet_v3_small", weights="none", image_size=64, **QUIET)
    head, _ = fit_head(cache, "logreg", "auto")
    head.save(tmp_path / "h.h5")
    out = export_head(tmp_path / "h.h5", tmp_path / "m.pt")
    plain = torchvision.models.mobilenet_v3_small(num_classes=2)
    plain.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert json.loads(out.with_suffix(".json").read_text())["arch"] == "mobilenet_v3_small"
    with Cache(cache) as c:
        x, paths = c.features("val")[()], c.paths("val")
    expected = dict(zip(paths, LinearHead.load(tmp_path / "h.h5").decision_function(x)))
    for model in (tmp_path / "h.h5", out):
        preds = predict(model, [data / "val"], device="cpu", workers=0)
        got = {str(Path(r["path"]).resolve().relative_to(data.resolve())): s for r, s in zip(preds.rows, preds.scores)}
        assert sorted(got) == sorted(expected)
        for p, s in got.items():
            np.testing.assert_allclose(s, expected[p], rtol=1e-3, atol=1e-3)


def test_squeezenet_head_predicts_its_own_logits_and_export_refuses(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 4, "val": 2})
    cache = tmp_path / "c.h5"
    extract(data, cache, arch="squeezenet1_0", weights="none", image_size=64, **QUIET)
    head, _ = fit_head(cache, "logreg", "auto")
    head.save(tmp_path / "h.h5")
    with pytest.raises(CnnCodesError, match="export refused"):  # stock torchvision adds a ReLU (test_claims)
        export_head(tmp_path / "h.h5", tmp_path / "m.pt")
    with Cache(cache) as c:
        expected = dict(zip(c.paths("val"), head.decision_function(c.features("val")[()])))
    preds = predict(tmp_path / "h.h5", [data / "val"], device="cpu", workers=0)
    got = {str(Path(r["path"]).resolve().relative_to(data.resolve())): s for r, s in zip(preds.rows, preds.scores)}
    assert sorted(got) == sorted(expected)
    for p, s in got.items():  # per file, logit by logit
        np.testing.assert_allclose(s, expected[p], rtol=1e-4, atol=1e-4)


def test_timm_backbone_extracts_with_its_own_preprocessing(tmp_path):
    pytest.importorskip("timm")
    pre = B.resolve_preprocessing("timm:resnet10t", B.WeightsInfo("none", "none"))
    assert (pre.crop, pre.resize, pre.interpolation) == (176, 201, "bicubic")
    data = write_folder(tmp_path / "data", {"train": 3, "val": 2})
    r = extract(data, tmp_path / "c.h5", arch="timm:resnet10t", weights="none", image_size=64, **QUIET)
    with Cache(r.cache) as c:
        assert c.feature_dim == 512 == B.code_dim("timm:resnet10t") and c.config.arch == "timm:resnet10t"
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet10t").state_dict(), str(tmp_path / "w.safetensors"))  # a full timm state_dict
    model, info, dim = B.create_extractor("timm:resnet10t", str(tmp_path / "w.safetensors"), fold_bn=False)
    assert info.kind == "file" and dim == 512
    bb = B.create_backbone("timm:test_vit", "none")
    assert bb.fixed_size == 160 and bb.classifier_name == "head"
    with pytest.raises(CnnCodesError, match="takes only 160x160"):
        B.resolve_preprocessing("timm:test_vit", B.WeightsInfo("none", "none"), 64)
    with pytest.raises(CnnCodesError, match="nearest: .*timm:resnet10t"):
        B.check_arch("timm:resnet10q")


def test_without_timm_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    B._timm.names.cache_clear()
    try:
        with pytest.raises(CnnCodesError, match=r'pip install "cnncodes\[timm\]"'):
            B.check_arch("timm:resnet10t")
    finally:
        B._timm.names.cache_clear()


MOBILENET_V2 = SHARED / "weights" / "mobilenet_v2-imagenet-features.pth"
EFFICIENTNET_LITE2 = SHARED / "weights" / "tf_efficientnet_lite2-imagenet.pth"
REAL_FILES = [("mobilenet_v2", MOBILENET_V2), ("resnet50", RESNET50_KERAS)]


@pytest.mark.slow
@pytest.mark.parametrize("arch,path", REAL_FILES, ids=[a for a, _ in REAL_FILES])
def test_real_weights_files_on_ants_bees_with_the_default_preprocessing(tmp_path, arch, path):
    # Both files were trained with the classic recipe (256/224), which a file that is not torchvision's
    # own now gets by default; with DEFAULT (V2)'s 232/224 they scored 94.1% and 93.5%.
    if not (path.is_file() and HYMENOPTERA.is_dir()):
        pytest.skip("needs ../shared")
    extract(HYMENOPTERA, tmp_path / "c.h5", arch=arch, weights=str(path), progress=False, log=lambda m: None)
    with Cache(tmp_path / "c.h5") as c:
        assert (c.config.preprocessing["resize"], c.config.preprocessing["crop"]) == (256, 224)
    head, report = fit_head(tmp_path / "c.h5", "logreg", "auto")
    acc = report["splits"]["val"]["accuracy"]
    print(f"{arch} {path.name}, logreg: val accuracy {acc}")
    assert acc is not None and acc >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("arch,path", [*REAL_FILES, ("timm:tf_efficientnet_lite2", EFFICIENTNET_LITE2)],
                         ids=["mobilenet_v2", "resnet50", "tf_efficientnet_lite2"])
def test_batchnorm_folding_with_real_weights_on_real_photos(arch, path):
    """The fold is a fast path: with each real file, on real photos, the folded model gives the plain
    model's codes within float rounding, and every BatchNorm that follows a conv is gone (or the
    log says why folding was skipped, and the codes are then the plain ones, bit for bit)."""
    if not (path.is_file() and HYMENOPTERA.is_dir()):
        pytest.skip("needs ../shared")
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    from cnncodes.backbones._fold import count_batchnorm
    from cnncodes.data import Normalize, discover

    layout = discover(HYMENOPTERA)
    info = B.resolve_weights(arch, str(path))
    pre = B.resolve_preprocessing(arch, info)
    photos = [layout.root / f.path for f in layout.splits["val"][:16]]
    x = Normalize(pre.mean, pre.std, channels_last=False)(torch.stack([pre.eval_view(pre.load(p)) for p in photos]))
    plain, _, _ = B.create_extractor(arch, info, fold_bn=False)
    notes = []
    folded, _, _ = B.create_extractor(arch, info, fold_bn=True, log=notes.append)
    with torch.inference_mode():
        a, b = plain(x), folded(x)
    rel = float(((a - b).norm(dim=1) / a.norm(dim=1)).max())
    print(f"{arch}: {folded.batchnorm_folding}; max relative difference {rel:.1e}; {notes}")
    if "folded into" in folded.batchnorm_folding:
        assert count_batchnorm(folded) == 0 and 0 < rel < 1e-4
    else:
        assert notes and torch.equal(a, b)
