"""The device decode path (`gpu_decode`) against the PIL path it replaces.

The pipeline takes the device as a parameter; on 'cpu' torchvision decodes with libjpeg-turbo
and, like the CUDA decoder, without EXIF orientation (cnncodes orients), so these tests emulate
the CUDA decoder exactly without a GPU, and run on 'cuda' too when there is one. Failures and
concurrency are shown with fake decoders injected into `DeviceLoader`.
"""

from __future__ import annotations

import io
import re
import struct
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_image, write_folder
from PIL import Image, ImageOps

from cnncodes.extract import api as extract_api
from cnncodes.data import ImageFiles, Preprocessing
from cnncodes.errors import CnnCodesError
from cnncodes.extract import ViewMaker, extract
from cnncodes.extract.runner import Runner
from cnncodes.gpu_decode import DeviceLoader, batch_decodable, orient, resolve_decode, scan
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
    assert device.fallbacks == {"no JPEG end marker (truncated?)": 1,
                                "4-channel JPEG (CMYK/YCCK); the device decoder takes 1 or 3": 1}
    assert sorted(device.decoders.values()) == [1, 10]  # the CMYK one by PIL, 10 by the device; bad.jpg by neither
    assert device.skipped == plain.skipped and [p for p, _ in device.skipped] == ["train/cat/bad.jpg"]
    with Cache(tmp_path / "plain.h5") as a, Cache(tmp_path / "device.h5") as b:
        for split in a.splits:
            assert list(a.paths(split)) == list(b.paths(split))
            np.testing.assert_array_equal(a.features(split)[()], b.features(split)[()])


# --------------------------------------------------------------------------- EXIF orientation


def _exif_jpeg_ii(img: Image.Image, orientation: int) -> bytes:
    """A JPEG with a little-endian ("II") EXIF orientation, written by hand (PIL writes "MM")."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff += struct.pack("<I", 0)
    app1 = b"Exif\x00\x00" + tiff
    data = _jpeg(img)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


@pytest.fixture
def oriented(tmp_path):
    """o1.jpg .. o8.jpg (EXIF orientation k, written by PIL) and ii3/ii6/ii8.jpg (little-endian EXIF),
    all of one asymmetric 40x24 picture, so every orientation gives a different view."""
    root = tmp_path / "oriented"
    root.mkdir()
    img = make_image(1, 7, 48).resize((40, 24))
    for k in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = k
        (root / f"o{k}.jpg").write_bytes(_jpeg(img, exif=exif))
    for k in (3, 6, 8):
        (root / f"ii{k}.jpg").write_bytes(_exif_jpeg_ii(img, k))
    return root, sorted(p.name for p in root.iterdir())


def test_the_header_scan_reads_the_orientation_pil_reads(oriented):
    root, names = oriented
    for name in names:
        data = (root / name).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            assert scan(data).orientation == im.getexif().get(0x0112, 1) != 0, name
    assert [scan((root / f"o{k}.jpg").read_bytes()).orientation for k in range(1, 9)] == list(range(1, 9))


def test_the_emulated_cuda_decode_is_oriented_like_pil_for_all_eight_orientations(oriented):
    """torchvision's CUDA decoder ignores EXIF; decoding without it and orienting must give PIL's view."""
    from torchvision.io import ImageReadMode, decode_jpeg

    root, names = oriented
    for name in names:
        data = (root / name).read_bytes()
        raw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                          apply_exif_orientation=False)  # exactly what the CUDA branch does
        with Image.open(root / name) as im:
            want = torch.from_numpy(np.array(ImageOps.exif_transpose(im).convert("RGB"))).permute(2, 0, 1)
        got = orient(raw, scan(data).orientation)
        assert got.shape == want.shape and torch.equal(got, want), name
        if scan(data).orientation != 1:
            assert not (raw.shape == want.shape and torch.equal(raw, want)), f"{name}: the test image is symmetric"


@pytest.mark.parametrize("device", DEVICES)
def test_device_loader_views_are_oriented_like_the_pil_path(oriented, device):
    root, names = oriented
    pre = Preprocessing.for_image_size(32)
    views = ViewMaker(pre, names, views=1, seed=0)
    loader = DeviceLoader(root, names, pre.load, views, batch_size=4, device=torch.device(device), threads=2)
    got = {i: t for b in loader for i, t in zip(b.indices.tolist(), b.images.cpu())}
    assert loader.fallbacks == 0 and loader.stats.device == len(names)
    for i, name in enumerate(names):
        want = ImageFiles(root, names, pre.load, views)[i][1]
        assert (got[i].int() - want.int()).abs().max() <= (0 if device == "cpu" else 1), name


# --------------------------------------------------------------------------- failures


def _real_decode(datas):
    from torchvision.io import ImageReadMode, decode_jpeg

    return [decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB,
                        apply_exif_orientation=False) for d in datas]


@pytest.fixture
def eight(tmp_path):
    root = write_folder(tmp_path / "eight", {"": 4}, size=40)
    return root, sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))


@pytest.mark.parametrize("error, fix", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "--batch-size"),
    (RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support"), "--decode cpu"),
    (NotImplementedError("Could not run 'image::decode_jpegs_cuda' with arguments from the 'CUDA' backend"), "--decode cpu"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "--decode cpu"),
    (RuntimeError("cudaEventRecord failed: an illegal memory access was encountered"), "--decode cpu"),
])
def test_device_and_memory_errors_stop_the_run_instead_of_falling_back(eight, error, fix):
    _assert_stops(eight, error, fix)


def _assert_stops(eight, error: Exception, fix: str) -> str:
    """Decode `eight` with a decoder that raises `error`: the run stops at the first call, in one line."""
    root, names = eight
    calls = []

    def failing(datas):
        calls.append(len(datas))
        raise error

    pre = Preprocessing.for_image_size(32)
    loader = DeviceLoader(root, names, pre.load, ViewMaker(pre, names, 0, 0), batch_size=8,
                          device=torch.device("cpu"), threads=2, decode_many=failing)
    with pytest.raises(CnnCodesError, match="--decode cpu") as caught:
        list(loader)
    assert fix in str(caught.value) and "\n" not in str(caught.value)
    assert calls == [8] and loader.stats.fallbacks == 0  # stopped at the first call, nothing fell back
    return str(caught.value)


# Every "Failed to <step>: <status>" torchvision 0.29's CUDA decoder raises (decode_jpegs_cuda.cpp), each with
# the status it would plausibly carry. Setup steps fail for the decoder whatever the status (an image-like one
# included); the steps handed an image's bytes fail for the device when the status says the device failed.
DEVICE_FAILURES = [
    ("Failed to initialize nvjpeg with hardware backend: 8", "NVJPEG_STATUS_INTERNAL_ERROR"),
    ("Failed to initialize nvjpeg with default backend: 7", "NVJPEG_STATUS_ARCH_MISMATCH"),
    ("Failed to create nvjpeg state: 1", "NVJPEG_STATUS_NOT_INITIALIZED"),
    ("Failed to create nvjpeg decoder: 9", "NVJPEG_STATUS_IMPLEMENTATION_NOT_SUPPORTED"),
    ("Failed to create nvjpeg decoder state: 2", "NVJPEG_STATUS_INVALID_PARAMETER"),
    ("Failed to create pinned buffer: 8", "NVJPEG_STATUS_INTERNAL_ERROR"),
    ("Failed to create device buffer: 8", "NVJPEG_STATUS_INTERNAL_ERROR"),
    ("Failed to create jpeg stream: 2", "NVJPEG_STATUS_INVALID_PARAMETER"),
    ("Failed to create decode params: 8", "NVJPEG_STATUS_INTERNAL_ERROR"),
    ("Failed to initialize batch decoding: 8", "NVJPEG_STATUS_INTERNAL_ERROR"),
    ("Failed to attach device buffer: 2", "NVJPEG_STATUS_INVALID_PARAMETER"),
    ("Failed to set output format: 2", "NVJPEG_STATUS_INVALID_PARAMETER"),
    ("Failed to attach pinned buffer: 2", "NVJPEG_STATUS_INVALID_PARAMETER"),
    ("Failed to synchronize CUDA stream: 700", "cudaError_t 700"),  # cudaErrorIllegalAddress
    ("Failed to get image info: 1", "NVJPEG_STATUS_NOT_INITIALIZED"),
    ("Failed to parse jpeg stream: 8", "NVJPEG_STATUS_INTERNAL_ERROR"),
    ("Failed to decode batch: 6", "NVJPEG_STATUS_EXECUTION_FAILED"),
    ("Failed to decode jpeg stream: 6", "NVJPEG_STATUS_EXECUTION_FAILED"),
    ("Failed to transfer jpeg to device: 6", "NVJPEG_STATUS_EXECUTION_FAILED"),
    ("Error while decoding JPEG images: Failed to decode batch: 7", "NVJPEG_STATUS_ARCH_MISMATCH"),  # 0.29's wrapping
    ("Failed to decode batch: 42", "a status nvjpeg.h does not define"),  # never guessed to be the image's
]
MEMORY_FAILURES = [("Failed to decode batch: 5", "NVJPEG_STATUS_ALLOCATOR_FAILURE"),
                   ("Failed to create device buffer: 5", "NVJPEG_STATUS_ALLOCATOR_FAILURE")]
IMAGE_FAILURES = [
    ("Failed to get image info: 3", "NVJPEG_STATUS_BAD_JPEG"),
    ("Failed to parse jpeg stream: 10", "NVJPEG_STATUS_INCOMPLETE_BITSTREAM"),
    ("Failed to decode batch: 2", "NVJPEG_STATUS_INVALID_PARAMETER"),
    ("Failed to decode jpeg stream: 4", "NVJPEG_STATUS_JPEG_NOT_SUPPORTED"),
    ("Failed to transfer jpeg to device: 9", "NVJPEG_STATUS_IMPLEMENTATION_NOT_SUPPORTED"),
    ("Error while decoding JPEG images: Failed to decode batch: 3", "NVJPEG_STATUS_BAD_JPEG"),
    ("Unknown chroma subsampling", None),  # the image's header, no status
]
# Steps only torchvision's CUDA *encoder* words this way (encode_jpegs_cuda.cpp): never raised while decoding.
ENCODER_STEPS = {"create nvjpeg handle", "create nvjpeg encoder state", "create nvjpeg encoder params",
                 "set nvjpeg encoder params quality", "set nvjpeg encoder params sampling factors",
                 "retrieve encoded image stream state", "retrieve encoded image"}


@pytest.mark.parametrize("message, status", DEVICE_FAILURES, ids=[m for m, _ in DEVICE_FAILURES])
def test_a_device_side_nvjpeg_failure_stops_the_run_in_one_line(eight, message, status):
    line = _assert_stops(eight, RuntimeError(message), "--decode cpu")
    assert "a driver or device error, not a bad image" in line and f"{message} = {status}" in line


@pytest.mark.parametrize("message, status", MEMORY_FAILURES, ids=[m for m, _ in MEMORY_FAILURES])
def test_an_nvjpeg_allocator_failure_is_out_of_memory(eight, message, status):
    line = _assert_stops(eight, RuntimeError(message), "--batch-size")
    assert line.startswith("out of memory decoding 8 JPEGs") and f"{message} = {status}" in line


@pytest.mark.parametrize("message, status", IMAGE_FAILURES, ids=[m for m, _ in IMAGE_FAILURES])
def test_an_image_nvjpeg_failure_falls_back_to_the_cpu_for_that_image(eight, message, status):
    root, names = eight
    bad = (root / names[2]).read_bytes()

    def refuses_one(datas):
        if bad in datas:
            raise RuntimeError(message)
        return _real_decode(datas)

    pre = Preprocessing.for_image_size(32)
    loader = DeviceLoader(root, names, pre.load, ViewMaker(pre, names, 0, 0), batch_size=8,
                          device=torch.device("cpu"), threads=2, decode_many=refuses_one)
    assert sum(len(b.indices) for b in loader) == 8
    assert loader.stats.device == 7 and loader.stats.cpu == 1
    named = f"{message} = {status}" if status else message
    assert loader.stats.reasons == {f"the device decoder refused it ({named})": 1}  # reported, with the status named


def _steps(messages: list[tuple[str, str | None]]) -> set[str]:
    return {m.group(1) for m in (re.search(r"Failed to ([^:]+):", msg) for msg, _ in messages) if m}


def test_the_failure_tables_cover_every_step_the_installed_torchvision_reports():
    """The steps above are read from torchvision's source; this torchvision's image library must word no other
    "Failed to <step>: " (a new one would stop the run as a device error until classified here)."""
    import torchvision

    from cnncodes.gpu_decode.decoder import IMAGE_STEPS

    libraries = sorted(Path(torchvision.__file__).parent.glob("image*.so"))
    found = {m.decode() for lib in libraries for m in re.findall(rb"Failed to ([A-Za-z ]+): \x00", lib.read_bytes())}
    if not found:
        pytest.skip(f"this torchvision ({torchvision.__version__}) has no CUDA JPEG decoder to read")
    assert found - ENCODER_STEPS == _steps(DEVICE_FAILURES + MEMORY_FAILURES + IMAGE_FAILURES)
    assert IMAGE_STEPS == _steps(IMAGE_FAILURES)  # each step handed an image is shown falling back


def test_an_oom_from_the_cli_is_one_line_naming_the_fixes(tmp_path, monkeypatch, cli):
    folder = write_folder(tmp_path / "data", {"train": 2}, size=40)

    def oom(datas):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(extract_api, "resolve_decode", lambda decode, dev: "gpu")  # the device path, on CPU
    monkeypatch.setattr(Runner, "decode_many", staticmethod(oom))
    proc = cli("extract", folder, "-o", tmp_path / "c.h5", "--weights", "none", "--image-size", "32", "-q", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "out of memory" in proc.stderr and "--batch-size" in proc.stderr and "--decode cpu" in proc.stderr


def test_one_corrupt_file_costs_one_fallback_not_its_batch(eight):
    """A file with a valid header that the decoder refuses: the batch call fails, bisection finds it."""
    root, names = eight
    bad = (root / names[5]).read_bytes()
    calls = []

    def refuses_one(datas):
        calls.append(len(datas))
        if bad in datas:
            raise RuntimeError("Failed to decode batch: 3")  # NVJPEG_STATUS_BAD_JPEG: an image error
        return _real_decode(datas)

    pre = Preprocessing.for_image_size(32)
    views = ViewMaker(pre, names, 0, 0)
    loader = DeviceLoader(root, names, pre.load, views, batch_size=8, device=torch.device("cpu"), threads=2,
                          decode_many=refuses_one)
    batches = list(loader)
    assert loader.stats.fallbacks == 1 and loader.stats.device == 7 and loader.stats.cpu == 1
    assert list(loader.stats.reasons) == ["the device decoder refused it (Failed to decode batch: 3 = "
                                          "NVJPEG_STATUS_BAD_JPEG)"]
    assert len(calls) <= 1 + 2 * 3 and sum(calls) < 8 * 4  # a bisection, not 8 single decodes after the batch
    got = torch.cat([b.images for b in batches])
    want = torch.stack([ImageFiles(root, names, pre.load, views)[i][1] for i in range(8)])
    assert torch.equal(got, want)  # the refused one decoded by PIL, in its place


def test_a_decoder_refusing_every_image_is_a_decoder_error(eight):
    root, names = eight

    def refuses_all(datas):
        raise RuntimeError("Failed to get image info: 2")

    pre = Preprocessing.for_image_size(32)
    loader = DeviceLoader(root, names, pre.load, ViewMaker(pre, names, 0, 0), batch_size=8,
                          device=torch.device("cpu"), threads=2, decode_many=refuses_all)
    with pytest.raises(CnnCodesError, match="refused all 8 JPEGs.*--decode cpu"):
        list(loader)


# --------------------------------------------------------------------------- overlap


def test_reading_decoding_and_the_network_overlap(eight):
    """While the caller holds batch 0 (the network), batch 1 is being decoded and batch 2 read.

    The fakes block until the caller has seen all three stages busy at once (or give up after a
    timeout): a serial loader cannot reach that state, so the flags stay unset and the test fails."""
    root, names = eight
    batch_of = {name: k // 2 for k, name in enumerate(names)}  # 4 batches of 2
    reading = [threading.Event() for _ in range(4)]
    decoding = [threading.Event() for _ in range(4)]
    network_done = threading.Event()
    data_to_batch = {(root / n).read_bytes(): batch_of[n] for n in names}

    def slow_read(path):
        b = batch_of[str(path.relative_to(root))]
        reading[b].set()
        if b == 2:
            network_done.wait(5)  # stay busy reading batch 2 while the network runs on batch 0
        return path.read_bytes()

    def slow_decode(datas):
        b = data_to_batch[datas[0]]
        decoding[b].set()
        if b == 1:
            network_done.wait(5)  # stay busy decoding batch 1 while the network runs on batch 0
        return _real_decode(datas)

    pre = Preprocessing.for_image_size(32)
    loader = DeviceLoader(root, names, pre.load, ViewMaker(pre, names, 0, 0), batch_size=2,
                          device=torch.device("cpu"), threads=2, decode_many=slow_decode, read=slow_read)
    seen = []
    for batch in loader:
        if not seen:  # the "network" on batch 0
            overlapped = decoding[1].wait(5) and reading[2].wait(5)
            network_done.set()
        seen.extend(batch.indices.tolist())
    assert overlapped, "batch 1 was not decoding and batch 2 not reading while the network ran on batch 0"
    assert seen == list(range(8))


# --------------------------------------------------------------------------- the cache's identity


def test_the_decoder_is_part_of_the_cache_identity(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "data", {"train": 2}, size=40)
    out = tmp_path / "c.h5"
    kw = {"weights": "none", "image_size": 32, "progress": False, "log": lambda m: None}
    extract(folder, out, decode="cpu", **kw)
    with Cache(out) as c:
        assert c.config.decode.startswith("cpu:pil-")
    monkeypatch.setattr(extract_api, "resolve_decode", lambda decode, dev: "gpu")  # the device path, on CPU
    with pytest.raises(CnnCodesError, match="another configuration.*decode: cache has 'cpu:pil'.*--overwrite"):
        extract(folder, out, **kw)
    r = extract(folder, out, overwrite=True, **kw)
    assert r.decoders == {f"cpu:libjpeg-torchvision-{__import__('torchvision').__version__}": 4}
    with Cache(out) as c:
        assert c.config.decode.startswith("cpu:libjpeg-torchvision-")
        assert "device-decoded JPEGs at full size" in c.config.preprocessing["jpeg_draft"]


def test_a_cache_without_a_recorded_decoder_reads_as_pil_and_grows(tmp_path):
    folder = write_folder(tmp_path / "data", {"train": 2}, size=40)
    out = tmp_path / "c.h5"
    kw = {"weights": "none", "image_size": 32, "progress": False, "log": lambda m: None}
    extract(folder, out, **kw)
    with h5py.File(out, "r+") as f:  # as written before the decoder was recorded
        config = __import__("json").loads(f.attrs["config"])
        del config["decode"]
        f.attrs["config"] = __import__("json").dumps(config)
    with Cache(out) as c:
        assert c.config.decode == "cpu:pil"
    make_image(0, 50, 40).save(folder / "train" / "cat" / "new.jpg")
    r = extract(folder, out, **kw)  # an incremental add with the same (CPU) decoder is no config change
    assert r.extracted == 3 and r.shards["done"] == 1 and r.split_counts == {"train": 5}  # the cat shard alone


def test_the_up_to_date_request_names_the_decoder():
    from cnncodes.extract import ExtractConfig
    from cnncodes.uptodate import request_key

    def key(decode):
        return request_key(weights_sha256="", **ExtractConfig(decode=decode).request())

    assert key("auto") == key("cpu") != key("gpu")  # auto decodes on the CPU until a GPU check passed
    assert '"decode"' not in key("cpu")  # keys recorded before the field still match


def test_help_labels_gpu_decoding_as_unmeasured(cli):
    out = cli("extract", "--help").stdout
    assert "not yet measured on a GPU" in " ".join(out.split())


def test_a_torchvision_without_the_batched_decoder_is_refused_up_front(monkeypatch):
    import torchvision

    from cnncodes.gpu_decode.decoder import torchvision_decode

    monkeypatch.setattr(torchvision, "__version__", "0.18.1+cu121")
    with pytest.raises(CnnCodesError, match=r"needs torchvision >= 0\.19 .*this is 0\.18\.1.*--decode cpu"):
        torchvision_decode(torch.device("cpu"))


def test_out_of_memory_making_the_views_is_one_line_too(eight):
    root, names = eight
    pre = Preprocessing.for_image_size(32)

    class Oom(ViewMaker):
        def many(self, images, indices):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    loader = DeviceLoader(root, names, pre.load, Oom(pre, names, 0, 0), batch_size=8, device=torch.device("cpu"),
                          threads=2, decode_many=_real_decode)
    with pytest.raises(CnnCodesError, match="out of memory resizing the views of 8 JPEGs.*--batch-size"):
        list(loader)
