"""The device decode path (`gpu_decode`) against the PIL path it replaces.

The pipeline takes the device as a parameter; on 'cpu' torchvision decodes with
libjpeg-turbo, so these tests run without a GPU and also on 'cuda' when there is one.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import make_image, write_folder
from PIL import Image

from cnncodes.extract import api as extract_api
from cnncodes.data import ImageFiles, Preprocessing
from cnncodes.errors import CnnCodesError
from cnncodes.extract import ViewMaker, extract
from cnncodes.gpu_decode import DeviceLoader, batch_decodable, resolve_decode
from cnncodes.store import Cache

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture
def odd_images(tmp_path):
    """JPEGs the batch decoder takes, ones it must hand to PIL, and unreadable files."""
    root = tmp_path / "imgs"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    files = {
        "rgb.jpg": _jpeg(make_image(0, 1, 80).resize((80, 56))),
        "exif.jpg": _jpeg(make_image(1, 2, 72).resize((72, 48)), exif=exif),
        "gray.jpg": _jpeg(make_image(2, 3, 64).convert("L")),
        "cmyk.jpg": _jpeg(make_image(0, 4, 64).convert("CMYK")),  # nvJPEG cannot: PIL fallback
        "png.jpg": b"",  # filled below: a PNG with a .jpg name
        "truncated.jpg": _jpeg(make_image(1, 5, 64))[:700],
        "noise.jpg": np.random.default_rng(0).bytes(900),
        "empty.jpg": b"",
    }
    buf = io.BytesIO()
    make_image(1, 6, 50).save(buf, "PNG")
    files["png.jpg"] = buf.getvalue()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root, sorted(files)


def test_batch_decodable_takes_only_complete_three_or_one_channel_jpegs(odd_images):
    root, names = odd_images
    takes = {n for n in names if batch_decodable((root / n).read_bytes())}
    assert takes == {"rgb.jpg", "exif.jpg", "gray.jpg"}


@pytest.mark.parametrize("device", DEVICES)
def test_device_pipeline_matches_the_pil_path_within_one_grey_level(odd_images, device):
    root, names = odd_images
    pre = Preprocessing.for_image_size(32)
    views = ViewMaker(pre, names, views=2, seed=3)
    reference = [ImageFiles(root, names, pre.load, views)[i] for i in range(len(names))]
    loader = DeviceLoader(root, names, pre.load, views, batch_size=3, device=torch.device(device), threads=2)
    got, failed = {}, {}
    for batch in loader:
        assert batch.images.device.type == device
        got.update(zip(batch.indices.tolist(), batch.images.cpu()))
        failed.update(batch.failed)
    want_failed = {i: err for i, _, err in reference if err is not None}
    assert failed == want_failed and {names[i] for i in failed} == {"truncated.jpg", "noise.jpg", "empty.jpg"}
    assert sorted(got) == [i for i, t, _ in reference if t is not None]
    tolerance = 0 if device == "cpu" else 1  # libjpeg-turbo either way on CPU; nvJPEG's IDCT differs slightly
    for i, t, _ in reference:
        if t is not None:
            assert got[i].shape == t.shape == (3, 3, 32, 32), names[i]
            assert (got[i].int() - t.int()).abs().max() <= tolerance, names[i]
    assert loader.fallbacks == 4  # cmyk, png, truncated and noise went to PIL; empty was never decoded


def test_decode_gpu_without_cuda_is_a_clear_error(tmp_path, cli):
    assert resolve_decode("auto", torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CnnCodesError, match="--decode gpu needs the network on a CUDA device"):
        resolve_decode("gpu", torch.device("cpu"))
    folder = write_folder(tmp_path / "data", {"train": 1}, size=32)
    proc = cli("extract", folder, "-o", tmp_path / "c.h5", "--weights", "none", "--decode", "gpu", "--device", "cpu",
               check=False)
    assert proc.returncode == 2 and "--decode gpu needs the network on a CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_extract_through_the_device_loader_gives_the_same_cache(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "data", {"train": 3, "val": 2}, size=48)
    (folder / "train" / "cat" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    Image.open(folder / "val" / "dog" / "000.jpg").convert("CMYK").save(folder / "val" / "dog" / "cmyk.jpg")
    kw = {"weights": "none", "image_size": 32, "views": 1, "eval_views": 1, "progress": False, "log": lambda m: None}
    plain = extract(folder, tmp_path / "plain.h5", decode="cpu", **kw)
    monkeypatch.setattr(extract_api, "resolve_decode", lambda decode, dev: "gpu")  # the device path, on CPU
    device = extract(folder, tmp_path / "device.h5", **kw)
    assert device.decode == "gpu" and device.decode_fallbacks == 2 and plain.decode == "cpu"
    assert device.skipped == plain.skipped and [p for p, _ in device.skipped] == ["train/cat/bad.jpg"]
    with Cache(tmp_path / "plain.h5") as a, Cache(tmp_path / "device.h5") as b:
        for split in a.splits:
            assert list(a.paths(split)) == list(b.paths(split))
            np.testing.assert_array_equal(a.features(split)[()], b.features(split)[()])
