"""The batch decoder and its failures: an image error costs that image a CPU decode; anything else
(out of memory, a torchvision without nvJPEG, a driver error) stops the run with one line.
torchvision words nvJPEG's failures "Failed to <step>: <status number>": `NVJPEG_STATUS` and
`IMAGE_STEPS` say whose failure each is.

A failed batch call is bisected, so a batch of B images with one bad file costs about 2 log2(B)
extra calls of shrinking size and exactly one fallback, not B single decodes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from ..errors import CnnCodesError

DecodeMany = Callable[[list[bytes]], Sequence[torch.Tensor]]

# Whose failure an error is: the image's (it falls back to the CPU decoder) or not (the run stops).
IMAGE, DEVICE, MEMORY = "image", "device", "memory"
# torchvision's CUDA decoder (torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp, 0.19 to 0.29; the same
# messages are in 0.29.1's image_stable.so) reports a failed nvJPEG call as "Failed to <step>: <status>", the
# nvjpegStatus_t as a number, never its name (0.29 wraps it in "Error while decoding JPEG images: ...").
# The numbers as nvjpeg.h defines them, and whose failure each is when the step was handed an image's bytes:
NVJPEG_STATUS: dict[int, tuple[str, str]] = {
    1: ("NVJPEG_STATUS_NOT_INITIALIZED", DEVICE),
    2: ("NVJPEG_STATUS_INVALID_PARAMETER", IMAGE),  # the hardware decoder's answer to some odd files (DALI #3159)
    3: ("NVJPEG_STATUS_BAD_JPEG", IMAGE),
    4: ("NVJPEG_STATUS_JPEG_NOT_SUPPORTED", IMAGE),
    5: ("NVJPEG_STATUS_ALLOCATOR_FAILURE", MEMORY),
    6: ("NVJPEG_STATUS_EXECUTION_FAILED", DEVICE),  # "error during the execution of the device tasks"
    7: ("NVJPEG_STATUS_ARCH_MISMATCH", DEVICE),
    8: ("NVJPEG_STATUS_INTERNAL_ERROR", DEVICE),
    9: ("NVJPEG_STATUS_IMPLEMENTATION_NOT_SUPPORTED", IMAGE),  # a JPEG feature this nvJPEG lacks
    10: ("NVJPEG_STATUS_INCOMPLETE_BITSTREAM", IMAGE),
}
# The steps of that file that are handed one image's bytes (nvjpegGetImageInfo, nvjpegJpegStreamParse,
# nvjpegDecodeBatched, nvjpegDecodeJpegHost/Device, nvjpegDecodeJpegTransferToDevice): their status decides.
# Every other step (creating the handle, states, buffers, streams and params; nvjpegDecodeBatchedInitialize,
# which sees only the batch size; attaching buffers; setting the output format) and any step a later
# torchvision adds fails for the decoder, whatever the status; "synchronize CUDA stream" carries a cudaError_t.
IMAGE_STEPS = frozenset({"get image info", "parse jpeg stream", "decode batch", "decode jpeg stream",
                         "transfer jpeg to device"})
_STEP_FAILED = re.compile(r"Failed to ([^:\n]+): (\d+)")
_CUDA_STEP = "synchronize CUDA stream"
_OOM = re.compile(r"out of memory", re.IGNORECASE)
_NO_NVJPEG = re.compile(r"not compiled with nvjpeg|Could not run 'image::decode_jpegs?_cuda'", re.IGNORECASE)
_DEVICE = re.compile(r"CUDA error|CUDA driver|cudaError|CUDA_ERROR|device-side assert|cuda[A-Z]\w+ failed")
BATCHED_DECODE_SINCE = (0, 19)  # torchvision's decode_jpeg takes a list (one batched nvJPEG call) from 0.19
# A whole batch of header-checked JPEGs refused one by one is a decoder problem, not so many bad files.
_ALL_REFUSED_MIN = 4


def pil_identity() -> str:
    """The CPU path's decoder as the cache records it ("cpu:pil-<version>")."""
    import PIL

    return f"cpu:pil-{PIL.__version__}"


def device_identity(device: torch.device) -> str:
    """The device path's decoder: nvJPEG on CUDA, libjpeg-turbo when the same call runs on the CPU (tests)."""
    import torchvision

    library = "nvjpeg" if device.type == "cuda" else "libjpeg"
    return f"{device.type}:{library}-torchvision-{torchvision.__version__}"


def torchvision_decode(device: torch.device) -> DecodeMany:
    """torchvision's batched `decode_jpeg` on `device`, RGB, *without* EXIF orientation: the CUDA
    decoder ignores `apply_exif_orientation`, so it is off on the CPU too and `jpeg.orient` does it."""
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    version = tuple(int(v) for v in re.findall(r"\d+", torchvision.__version__)[:2])
    if version < BATCHED_DECODE_SINCE:
        raise CnnCodesError(f"--decode gpu needs torchvision >= {'.'.join(map(str, BATCHED_DECODE_SINCE))} (batched "
                            f"decode_jpeg), this is {torchvision.__version__}; pass --decode cpu")

    def decode_many(datas: list[bytes]) -> list[torch.Tensor]:
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        return decode_jpeg(tensors, device=device, mode=ImageReadMode.RGB, apply_exif_orientation=False)

    return decode_many


def step_failure(text: str) -> tuple[str, str] | None:
    """(IMAGE, DEVICE or MEMORY, the status as read) for a "Failed to <step>: <status>" message, else None."""
    m = _STEP_FAILED.search(text)
    if m is None:
        return None
    step, number = m.group(1), int(m.group(2))
    if step == _CUDA_STEP:
        return DEVICE, f"cudaError_t {number}"
    name, whose = NVJPEG_STATUS.get(number, ("a status nvjpeg.h does not define", DEVICE))  # never guess "image"
    if whose == IMAGE and step not in IMAGE_STEPS:
        whose = DEVICE  # an image-like status from a step that never saw an image
    return whose, name


def _named(line: str) -> str:
    """`line` with the status it reports by number named ("...: 6 = NVJPEG_STATUS_EXECUTION_FAILED")."""
    failure = step_failure(line)
    return f"{line} = {failure[1]}" if failure else line


def fatal_error(e: Exception, images: int, device: torch.device, doing: str = "decoding") -> CnnCodesError | None:
    """The one-line error for a failure that is not the image's, or None for an image error."""
    text = f"{type(e).__name__}: {e}".strip()
    line = _named(text.splitlines()[0][:200])
    failure = step_failure(text)
    whose = failure[0] if failure else None
    if isinstance(e, torch.cuda.OutOfMemoryError) or _OOM.search(text) or whose == MEMORY:
        return CnnCodesError(f"out of memory {doing} {images} JPEGs on {device} ({line}); "
                             f"pass a smaller --batch-size, or --decode cpu")
    if isinstance(e, NotImplementedError) or _NO_NVJPEG.search(text):
        return CnnCodesError(f"this torchvision cannot decode JPEGs on {device} ({line}); "
                             f"pass --decode cpu, or install a torchvision built with nvJPEG")
    if whose == DEVICE or _DEVICE.search(text):
        return CnnCodesError(f"the device decoder failed on {device} ({line}): a driver or device error, "
                             f"not a bad image; pass --decode cpu")
    return None


class BatchDecoder:
    """Decode a batch in one call; on an image error, bisect so only the bad images fall back.

    `decode_many` (default: torchvision on `device`) takes a list of JPEG bytes and returns one
    uint8 (3, H, W) tensor each, or raises. A call returns, per image, its tensor or the reason
    the decoder refused it (a str); fatal errors raise CnnCodesError.
    """

    def __init__(self, device: torch.device, decode_many: DecodeMany | None = None):
        self.device = device
        self.decode_many = decode_many or torchvision_decode(device)
        self.calls = 0  # decoder calls made (bisection included), for tests and the device check

    def __call__(self, datas: list[bytes]) -> list[torch.Tensor | str]:
        out = self._decode(datas)
        if len(datas) >= _ALL_REFUSED_MIN and all(isinstance(o, str) for o in out):
            raise CnnCodesError(f"the device decoder on {self.device} refused all {len(datas)} JPEGs of a batch, "
                                f"whose headers are valid (e.g. {out[0]}): a decoder problem, not so many bad "
                                f"images; pass --decode cpu")
        return out

    def _decode(self, datas: list[bytes]) -> list[torch.Tensor | str]:
        if not datas:
            return []
        self.calls += 1
        try:
            return list(self.decode_many(datas))
        except Exception as e:  # noqa: BLE001 - classified: fatal ones raise, image errors bisect
            fatal = fatal_error(e, len(datas), self.device)
            if fatal is not None:
                raise fatal from e
            if len(datas) == 1:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
                return [f"the device decoder refused it ({_named(first)})"]
        mid = len(datas) // 2
        return self._decode(datas[:mid]) + self._decode(datas[mid:])
