"""Claims checked from outside (issue 23): exports in stock torchvision, local weights files'
preprocessing, the cache read with h5py alone, and silent differences made loud or removed."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torchvision
from conftest import write_folder
from torchvision.models import MobileNet_V2_Weights
from torchvision.models._api import Weights, WeightsEnum

from cnncodes import backbones as B
from cnncodes.classifier import save_classifier
from cnncodes.data import Preprocessing
from cnncodes.errors import CnnCodesError
from cnncodes.extract import extract
from cnncodes.heads import fit_head
from cnncodes.predict import export_head
from cnncodes.store import Cache

QUIET = dict(progress=False, log=lambda m: None, workers=0)


# --------------------------------------------------------------------------- SqueezeNet in stock torchvision


def test_squeezenet_head_export_is_refused_with_the_reason(tmp_path, cli):
    data = write_folder(tmp_path / "data", {"train": 3, "val": 1})
    extract(data, tmp_path / "c.h5", arch="squeezenet1_1", weights="none", image_size=64, **QUIET)
    head, _ = fit_head(tmp_path / "c.h5", "logreg", "auto")
    head.save(tmp_path / "h.h5")
    with pytest.raises(CnnCodesError, match=r"export refused: .*classifier\.2 \(ReLU\).*cnncodes predict"):
        export_head(tmp_path / "h.h5", tmp_path / "m.pt")
    r = cli("export", tmp_path / "h.h5", "-o", tmp_path / "m.pt", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "export refused" in r.stderr
    assert not (tmp_path / "m.pt").exists()


@torch.inference_mode()
def test_a_saved_squeezenet_records_the_step_a_stock_loader_must_take(tmp_path):
    """A fine-tuned SqueezeNet has no ReLU after its classifier; its JSON says so, and stock
    torchvision following that step gives its logits exactly, image by image."""
    bb = B.create_backbone("squeezenet1_1", "none", num_classes=3)
    with torch.no_grad():
        bb.classifier().bias.copy_(torch.tensor([-5.0, 0.0, 5.0]))  # some logits below zero
    model = bb.model.eval()
    save_classifier(model, tmp_path / "m.pt", "squeezenet1_1", ["a", "b", "c"], Preprocessing(), {})
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["load_steps"] == ["replace module classifier.2 (ReLU) with torch.nn.Identity()"]
    stock = torchvision.models.get_model("squeezenet1_1", num_classes=3).eval()
    stock.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(stock(x), model(x))  # the strict load alone is not the model
    stock.classifier[2] = torch.nn.Identity()
    for got, want in zip(stock(x), model(x)):  # per image, every logit
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_other_archs_need_no_load_step():
    assert B.stock_loader_steps("resnet18") == [] and B.stock_mismatch("mobilenet_v3_small") is None
    assert B.stock_mismatch("squeezenet1_0") and B.stock_loader_steps("squeezenet1_0")


# --------------------------------------------------------------------------- a local weights file's preprocessing


def _weights_file(path, arch: str) -> tuple[str, str]:
    torch.save(torchvision.models.get_model(arch).state_dict(), path)
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_unknown_weights_file_takes_the_arch_original_recipe(tmp_path):
    path, _ = _weights_file(tmp_path / "mine.pth", "mobilenet_v2")  # DEFAULT (V2) is 232/224, V1 256/224
    info = B.resolve_weights("mobilenet_v2", path)
    notes = []
    pre = B.resolve_preprocessing("mobilenet_v2", info, log=notes.append)
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bilinear")
    assert len(notes) == 1 and "original eval recipe, IMAGENET1K_V1's" in notes[0] and "--preprocess-like" in notes[0]
    assert B.resolve_preprocessing("mobilenet_v2", info, like="DEFAULT").resize == 232  # the way back
    assert B.resolve_preprocessing("mobilenet_v2", B.WeightsInfo("none", "none")).resize == 232  # none: DEFAULT's
    assert B.resolve_preprocessing("resnet50", B.WeightsInfo("file", path, "0" * 64)).resize == 256  # V2 232


def test_a_file_that_is_published_weights_takes_their_transforms(tmp_path, monkeypatch):
    path, digest = _weights_file(tmp_path / "renamed.pth", "mobilenet_v2")
    v1, v2 = MobileNet_V2_Weights.IMAGENET1K_V1, MobileNet_V2_Weights.IMAGENET1K_V2

    class Fake(WeightsEnum):  # the real table, with V1's URL naming this file's hash (no download)
        IMAGENET1K_V1 = Weights(f"https://x/mobilenet_v2-{digest[:8]}.pth", v1.transforms, v1.meta)
        IMAGENET1K_V2 = Weights(v2.url, v2.transforms, v2.meta)
        DEFAULT = IMAGENET1K_V2

    monkeypatch.setattr(B._torchvision, "weights_enum", lambda arch: Fake)
    notes = []
    info = B.resolve_weights("mobilenet_v2", path)
    pre = B.resolve_preprocessing("mobilenet_v2", info, log=notes.append)
    assert pre.resize == 256 and "is torchvision's Fake.IMAGENET1K_V1 (sha256 matches)" in notes[0]

    class FakeV2(WeightsEnum):  # the same file named as V2: V2's transforms, although not DEFAULT's V1 here
        IMAGENET1K_V1 = Weights(v1.url, v1.transforms, v1.meta)
        IMAGENET1K_V2 = Weights(f"https://x/mobilenet_v2-{digest[:10]}.pth", v2.transforms, v2.meta)
        DEFAULT = IMAGENET1K_V1

    monkeypatch.setattr(B._torchvision, "weights_enum", lambda arch: FakeV2)
    assert B.resolve_preprocessing("mobilenet_v2", info).resize == 232


def test_extract_records_and_logs_the_file_recipe(tmp_path):
    data = write_folder(tmp_path / "data", {"train": 1, "val": 1})
    path, _ = _weights_file(tmp_path / "mine.pth", "mobilenet_v2")
    notes = []
    extract(data, tmp_path / "c.h5", arch="mobilenet_v2", weights=path, image_size=64,
            **{**QUIET, "log": notes.append})
    with Cache(tmp_path / "c.h5") as c:
        assert c.config.preprocessing["resize"] == round(64 * 256 / 224)  # V1's ratio, not V2's 232/224
    assert any("mine.pth: preprocessing: not a torchvision weights file" in n for n in notes)


# --------------------------------------------------------------------------- the cache read with h5py alone


def test_the_cache_describes_itself_and_the_four_line_load_gives_the_eval_view(tmp_path):
    import h5py

    data = write_folder(tmp_path / "data", {"train": 3, "val": 2})
    p = tmp_path / "c.h5"
    extract(data, p, arch="resnet18", weights="none", image_size=32, views=2, **QUIET)
    # the docs' load of the plain eval view, as written there
    with h5py.File(p) as f:
        X = f["train/features"][:]
        keep = f["train/views"][:] == 0
        X, y = X[keep], f["train/labels"][:][keep]
        classes = list(f["classes"].asstr()[:])
        attrs = {name: dict(f[f"train/{name}"].attrs) for name in ("features", "labels", "views", "paths")}
    assert X.shape == (6, 512) and len(keep) == 18  # 6 images, each with the eval view and 2 augmented ones
    with Cache(p) as c:
        plain = c.views("train") == 0
        np.testing.assert_array_equal(X, c.features("train")[()][plain])
        np.testing.assert_array_equal(y, c.labels("train")[plain])
        assert classes == c.classes == ["cat", "dog"]
    assert "views == 0 are the plain eval view" in attrs["features"]["description"]
    assert attrs["features"]["axes"] == "row, feature"
    assert all(a["description"] and a["axes"] == "row" for n, a in attrs.items() if n != "features")


def test_the_cache_records_batchnorm_folding_and_a_merge_only_run_keeps_it(tmp_path, cli):
    """BatchNorm folding moves codes by float rounding: the cache says it was done (and how much),
    also when the last run only merged finished shards, and `info` shows it."""
    import h5py

    data = write_folder(tmp_path / "data", {"train": 3, "val": 2})
    p = tmp_path / "c.h5"
    extract(data, p, arch="resnet18", weights="none", image_size=32, **QUIET)
    with h5py.File(p) as f:
        computed = json.loads(f.attrs["computed_with"])
    assert computed == {"batchnorm": "20 of 20 BatchNorm layers folded into the convolution before them",
                        "channels_last": True}
    (data / "train" / "cat" / "000.jpg").unlink()  # a rerun that extracts nothing, only rewrites the cache
    extract(data, p, arch="resnet18", weights="none", image_size=32, **QUIET)
    with h5py.File(p) as f:
        assert json.loads(f.attrs["computed_with"]) == computed
    assert "BatchNorm: 20 of 20 BatchNorm layers folded" in cli("info", p).stdout
    vit = tmp_path / "layers.h5"  # intermediate layers are pooled from the unfolded model
    extract(data, vit, arch="resnet18", weights="none", image_size=32, layers="layer1", **QUIET)
    with h5py.File(vit) as f:
        assert json.loads(f.attrs["computed_with"])["batchnorm"] == "not folded"


def test_a_model_holding_5d_tensors_runs_without_channels_last_and_says_so(tmp_path):
    """A traced timm Swin stage holds a 5-d attention mask, which channels_last cannot take: the
    extraction runs in the default layout (same codes), notes it and records it, no traceback."""
    pytest.importorskip("timm")
    import h5py

    data = write_folder(tmp_path / "data", {"train": 1, "val": 1})
    notes = []
    p = tmp_path / "swin.h5"
    extract(data, p, arch="timm:swin_tiny_patch4_window7_224", weights="none", layers="layers.0",
            progress=False, log=notes.append, workers=0)
    assert any("channels_last skipped" in n for n in notes)
    with h5py.File(p) as f:
        assert json.loads(f.attrs["computed_with"])["channels_last"] is False
        assert f["train/features"].shape == (2, 96)


# --------------------------------------------------------------------------- silent differences (issue 23, item 7)


def test_a_multi_picture_phone_jpeg_gets_the_reduced_dct_decode(tmp_path):
    from PIL import Image

    from cnncodes.data import load_rgb

    first, second = Image.new("RGB", (800, 600), (10, 200, 30)), Image.new("RGB", (800, 600), (200, 0, 0))
    first.save(tmp_path / "phone.jpg", "MPO", save_all=True, append_images=[second])
    first.save(tmp_path / "plain.jpg", "JPEG")
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"
    mpo, jpeg = load_rgb(tmp_path / "phone.jpg", 100), load_rgb(tmp_path / "plain.jpg", 100)
    assert mpo.size == jpeg.size == (200, 150)  # 1/4 DCT scale keeps both sides >= 100, like a JPEG
    assert np.abs(np.asarray(mpo, np.int16) - (10, 200, 30)).max() <= 3  # the first picture


def test_16_bit_images_are_scaled_by_their_mode_not_their_values(tmp_path):
    from PIL import Image

    from cnncodes.data import load_rgb

    dark = np.full((32, 32), 200, np.uint16)  # a dark 16-bit image: 200 of 65535
    Image.fromarray(dark).save(tmp_path / "dark.png")
    Image.fromarray(dark + 100).save(tmp_path / "darkish.png")  # 300 of 65535: nearly the same
    a, b = (np.asarray(load_rgb(tmp_path / n)) for n in ("dark.png", "darkish.png"))
    assert Image.open(tmp_path / "dark.png").mode == "I;16"
    assert a.max() <= 1 and b.max() <= 2  # both near black (they were 200 and 1 before: 257x apart)
    full = np.full((8, 8), 65535, np.uint16)
    Image.fromarray(full).save(tmp_path / "white.png")
    assert np.asarray(load_rgb(tmp_path / "white.png")).min() == 255


@torch.inference_mode()
def test_layer_pooling_knows_swin_stages_are_channels_last_at_any_size():
    """At 384 px swin_t's first stage is (N, 96, 96, 96): a shape cannot tell NHWC from NCHW."""
    from cnncodes.backbones._layers import channels_last_layers, layer_extractor

    bb = B.create_backbone("swin_t", "none")
    model, dim = layer_extractor(bb, "features.1,features.0.0,features.2")  # the graph stops at features.2
    assert dim == 96 + 96 + 192
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    plain = bb.model.eval()
    stage1 = plain.features[:2](x)  # (N, H, W, C) = (1, 96, 96, 96)
    stem_conv = plain.features[0][0](x)  # the patch conv: (N, C, H, W)
    merged = plain.features[2](stage1)  # patch merging: (N, 48, 48, 192)
    expected = torch.cat([stage1.mean(dim=(1, 2)), stem_conv.mean(dim=(2, 3)), merged.mean(dim=(1, 2))], dim=1)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert channels_last_layers(bb, ["norm", "permute", "avgpool"]) == {"norm"}  # back to NCHW after `permute`
    assert not torch.allclose(stage1.mean(dim=(2, 3)), stage1.mean(dim=(1, 2)), atol=1e-3)  # the layouts differ


@torch.inference_mode()
def test_layer_pooling_sees_a_convnext_block_run_channels_last():
    """Inside a ConvNeXt block (an NCHW model) the MLP runs on (N, H, W, C): no model-level rule
    says so; the layout is read from which axis follows the input's width."""
    from cnncodes.backbones._layers import layer_extractor

    bb = B.create_backbone("convnext_tiny", "none")
    model, dim = layer_extractor(bb, "features.1.0.block.3,features.1.0.block.0")
    assert dim == 384 + 96
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    block = bb.model.eval().features[1][0].block
    dw = block[0](bb.model.features[0](x))  # depthwise conv: (N, C, H, W)
    mlp = block[3](block[2](block[1](dw)))  # permute, LayerNorm, Linear: (N, H, W, 4C) = (1, 16, 16, 384)
    torch.testing.assert_close(model(x), torch.cat([mlp.mean(dim=(1, 2)), dw.mean(dim=(2, 3))], dim=1),
                               rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_layer_pooling_knows_timm_nhwc_models():
    pytest.importorskip("timm")
    from cnncodes.backbones._layers import channels_last_layers

    bb = B.create_backbone("timm:swin_tiny_patch4_window7_224", "none")
    assert channels_last_layers(bb, ["patch_embed.proj", "patch_embed", "layers.0", "norm"]) == {
        "patch_embed", "layers.0", "norm"}
    plain = bb.model.eval()
    stage = plain.layers[0](plain.patch_embed(torch.zeros(1, 3, 224, 224)))
    assert stage.shape == (1, 56, 56, 96)  # what the set says: (N, H, W, C)
    assert channels_last_layers(B.create_backbone("timm:resnet10t", "none"), ["layer1"]) == set()


def test_predict_says_what_it_runs_for_an_fp16_head_on_cpu(tmp_path, cli):
    from cnncodes.heads import LinearHead
    from cnncodes.predict import predict

    data = write_folder(tmp_path / "data", {"train": 2, "val": 1})
    extract(data, tmp_path / "c.h5", arch="resnet18", weights="none", image_size=32, **QUIET)
    head, _ = fit_head(tmp_path / "c.h5", "logreg", "auto")
    head.meta["precision"] = "fp16"  # as if extracted on a GPU in fp16
    head.save(tmp_path / "h.h5")
    assert LinearHead.load(tmp_path / "h.h5").meta["precision"] == "fp16"
    notes = []
    got = predict(tmp_path / "h.h5", [data / "val"], device="cpu", workers=0, note=notes.append)
    assert len(notes) == 1 and "extracted in fp16" in notes[0] and "predicting in fp32" in notes[0]
    plain = predict(tmp_path / "h.h5", [data / "val"], device="cpu", workers=0, precision="fp32", note=notes.append)
    np.testing.assert_array_equal(got.scores, plain.scores)  # fp32 it is, not bf16
    assert len(notes) == 1  # asked for fp32: nothing to say
    with pytest.raises(CnnCodesError, match="fp16 needs a CUDA device"):  # asked for fp16 explicitly: refused
        predict(tmp_path / "h.h5", [data / "val"], device="cpu", workers=0, precision="fp16")
    r = cli("predict", tmp_path / "h.h5", data / "val", "--device", "cpu", "--workers", "0")
    assert "note: " in r.stderr and "predicting in fp32" in r.stderr


def test_a_file_cache_made_under_the_old_preprocessing_rule_is_not_up_to_date(tmp_path):
    import h5py

    from cnncodes.sources import as_source
    from cnncodes.uptodate import request_key, up_to_date, weights_sha256

    data = write_folder(tmp_path / "data", {"train": 1, "val": 1})
    path, _ = _weights_file(tmp_path / "mine.pth", "resnet18")
    extract(data, tmp_path / "c.h5", arch="resnet18", weights=path, image_size=32, **QUIET)
    kw = dict(arch="resnet18", weights=path, image_size=32, precision="fp32", views=0, eval_views=0, seed=0)
    request = request_key(weights_sha256=weights_sha256(path), **kw)
    assert up_to_date(as_source(data), tmp_path / "c.h5", request) is not None  # this rule's cache: a no-op rerun
    with h5py.File(tmp_path / "c.h5", "r+") as f:  # as recorded before the rule (DEFAULT's transforms then)
        old = json.loads(f.attrs["request"])
        del old["file_preprocessing"]
        f.attrs["request"] = json.dumps(old, sort_keys=True)
    assert up_to_date(as_source(data), tmp_path / "c.h5", request) is None  # the full check runs, and sees the change
