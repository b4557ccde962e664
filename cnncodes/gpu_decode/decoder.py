"""The batch decoder and its failures: an image error costs that image a CPU decode; anything else
(out of memory, a torchvision without nvJPEG, a driver error) stops the run with one line.

A failed batch call is bisected, so a batch of B images with one bad file costs about 2 log2(B)
extra calls of shrinking size and exactly one fallback, not B single decodes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from ..errors import CnnCodesError

DecodeMany = Callable[[list[bytes]], Sequence[torch.Tensor]]
# Messages that say the decoder or the device failed, not the image. torchvision's CUDA decoder
# words its failures "Failed to <step>: <nvjpegStatus_t number>" (5 = NVJPEG_STATUS_ALLOCATOR_FAILURE);
# its per-image steps (image info, chroma subsampling, parse, decode) are image errors.
_OOM = re.compile(r"out of memory|NVJPEG_STATUS_ALLOCATOR_FAILURE|Failed to [^:]*: 5\b", re.IGNORECASE)
_NO_NVJPEG = re.compile(r"not compiled with nvjpeg|Could not run 'image::decode_jpegs?_cuda'", re.IGNORECASE)
_DEVICE = re.compile(r"CUDA error|CUDA driver|cudaError|CUDA_ERROR|device-side assert|Failed to initialize nvjpeg"
                     r"|Failed to create|Failed to synchronize CUDA|Failed to attach|NVJPEG_STATUS_(NOT_INITIALIZED"
                     r"|ARCH_MISMATCH|INTERNAL_ERROR|EXECUTION_FAILED)")
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


def fatal_error(e: Exception, images: int, device: torch.device, doing: str = "decoding") -> CnnCodesError | None:
    """The one-line error for a failure that is not the image's, or None for an image error."""
    text = f"{type(e).__name__}: {e}".strip()
    line = text.splitlines()[0][:200]
    if isinstance(e, torch.cuda.OutOfMemoryError) or _OOM.search(text):
        return CnnCodesError(f"out of memory {doing} {images} JPEGs on {device} ({line}); "
                             f"pass a smaller --batch-size, or --decode cpu")
    if isinstance(e, NotImplementedError) or _NO_NVJPEG.search(text):
        return CnnCodesError(f"this torchvision cannot decode JPEGs on {device} ({line}); "
                             f"pass --decode cpu, or install a torchvision built with nvJPEG")
    if _DEVICE.search(text):
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
                return [f"the device decoder refused it ({first})"]
        mid = len(datas) // 2
        return self._decode(datas[:mid]) + self._decode(datas[mid:])
