"""Folder discovery and image decoding: every mode becomes 8-bit RGB, bad files become reasons."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import make_image, write_folder
from PIL import Image

from cnncodes import data
from cnncodes.data import BadImage, Preprocessing, discover, load_rgb
from cnncodes.errors import CnnCodesError


def test_discover_splits_share_one_class_list(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 2, "val": 1, "test": 1}, classes=("b", "a", "c"))
    layout = discover(root)
    assert layout.classes == ["a", "b", "c"]
    assert sorted(layout.splits) == ["test", "train", "val"]
    assert [f.label for f in layout.splits["val"]] == [0, 1, 2]
    assert layout.splits["train"][0].path == "train/a/000.jpg"


def test_discover_single_level_folder_is_one_train_split(tmp_path):
    root = write_folder(tmp_path / "d", {"": 3})
    layout = discover(root)
    assert list(layout.splits) == ["train"]
    assert len(layout.splits["train"]) == 6 and layout.splits["train"][0].path == "cat/000.jpg"


def test_val_class_missing_from_train_is_reported(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 2, "val": 1})
    write_folder(tmp_path / "d", {"val": 1}, classes=("zebra",))
    layout = discover(root)
    assert "zebra" in layout.classes
    assert any("zebra" in w and "no training images" in w for w in layout.warnings)


def test_empty_class_folder_and_non_images_are_reported(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 2})
    (root / "train" / "empty").mkdir()
    (root / "train" / "cat" / "notes.txt").write_text("hello")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    layout = discover(root)
    assert layout.classes == ["cat", "dog"]
    assert any("empty class folder" in w for w in layout.warnings)
    assert layout.ignored["train"] == [("train/cat/notes.txt", "not an image (unsupported extension '.txt')")]


@pytest.mark.parametrize("problem", ["missing", "file", "empty"])
def test_discover_bad_roots_raise_clear_errors(tmp_path, problem):
    root = tmp_path / "d"
    if problem == "file":
        root.write_text("x")
    elif problem == "empty":
        root.mkdir()
    with pytest.raises(CnnCodesError, match=str(root)):
        discover(root)


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_every_image_mode_becomes_rgb(tmp_path):
    base = make_image(0, 0, 48)
    cases = {
        "gray.png": base.convert("L"),
        "palette.gif": base.convert("P"),
        "rgba.png": base.convert("RGBA"),
        "la.png": base.convert("LA"),
        "cmyk.jpg": base.convert("CMYK"),
        "pic.webp": base,
        "pic.bmp": base,
        "pic.tiff": base,
    }
    for name, img in cases.items():
        out = load_rgb(_save(img, tmp_path / name))
        assert out.mode == "RGB" and out.size == (48, 48), name
    # 16-bit grayscale keeps its brightness (not clipped to white)
    arr16 = (np.linspace(0, 65535, 48 * 48).reshape(48, 48)).astype(np.uint16)
    out = np.asarray(load_rgb(_save(Image.fromarray(arr16), tmp_path / "deep.png")))
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255 and 100 < out.mean() < 155


def test_transparent_palette_is_composited_on_white(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    out = load_rgb(_save(img, tmp_path / "t.png", transparency=0))
    assert np.asarray(out).min() == 255  # fully transparent black -> white


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = load_rgb(_save(img, tmp_path / "rot.jpg", exif=exif))
    assert out.size == (20, 40)


def _truncated_jpeg(path):
    buf = io.BytesIO()
    make_image(0, 0, 64).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("zero.jpg", b"", "empty file"),
        ("noise.jpg", np.random.default_rng(0).bytes(2000), "not a readable image"),  # seeded: stable test ids
        ("text.png", b"this is not a png\n" * 10, "not a readable image"),
    ],
    ids=["zero", "noise", "text"],
)
def test_bad_files_raise_badimage_with_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadImage, match=reason):
        load_rgb(path)


def test_truncated_jpeg_is_bad(tmp_path):
    with pytest.raises(BadImage, match="truncated"):
        load_rgb(_truncated_jpeg(tmp_path / "half.jpg"))


def test_a_new_image_size_keeps_everything_but_the_sizes():
    base = Preprocessing(resize=342, crop=299, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
                         view_scale=(0.35, 1.0))
    pre = Preprocessing.for_image_size(128, base)
    assert (pre.resize, pre.crop) == (146, 128)  # 342/299 kept
    assert (pre.mean, pre.std, pre.interpolation, pre.view_scale) == (base.mean, base.std, "bicubic", (0.35, 1.0))


def test_random_views_are_seeded_and_eval_view_is_deterministic():
    import torch

    pre = Preprocessing.for_image_size(32)
    img = make_image(1, 2, 64)
    a = pre.random_view(img, torch.Generator().manual_seed(5))
    b = pre.random_view(img, torch.Generator().manual_seed(5))
    c = pre.random_view(img, torch.Generator().manual_seed(6))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(pre.eval_view(img), pre.eval_view(img))


def test_threaded_loader_gives_the_batches_of_a_plain_loader(tmp_path):
    """workers=0 decodes on a pool of threads: same order, same pixels, same failures, and the
    process's warning filters are left as they were."""
    import warnings

    import torch

    from cnncodes.data import ImageFiles, ThreadedLoader, make_loader

    root = write_folder(tmp_path / "d", {"train": 4}, size=48) / "train"  # 8 images
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "dog" / "empty.png").write_bytes(b"")
    pre = Preprocessing.for_image_size(32)
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*.*"))
    dataset = ImageFiles(root, paths, pre.load, lambda img, i: pre.eval_view(img))
    cpu = torch.device("cpu")
    before = list(warnings.filters)
    threaded = list(make_loader(dataset, 4, 0, cpu, threads=2))
    assert warnings.filters == before
    plain = list(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=data.collate_skipping))
    assert isinstance(make_loader(dataset, 4, 0, cpu, threads=2), ThreadedLoader)
    assert len(threaded) == len(plain) == 3
    for t, p in zip(threaded, plain):
        assert torch.equal(t.indices, p.indices) and torch.equal(t.images, p.images) and t.failed == p.failed
    failed = {paths[i]: why for b in threaded for i, why in b.failed}
    assert set(failed) == {"cat/broken.jpg", "dog/empty.png"} and "0 bytes" in failed["dog/empty.png"]


def test_tensor_views_match_torchvision_pil_transforms_within_one_grey_level():
    from torchvision import transforms

    pre = Preprocessing()
    for size in [(500, 375), (333, 500), (640, 480)]:
        img = make_image(3, 1, 64).resize(size)
        reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])(img)
        ours = pre.eval_view(img)
        assert ours.shape == reference.shape == (3, 224, 224)
        assert (ours.int() - reference.int()).abs().max() <= 1
