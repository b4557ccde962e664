"""Decode on the device: threads read file bytes, JPEGs are decoded in batches by nvJPEG
(`torchvision.io.decode_jpeg(..., device='cuda')`), oriented and made into views there.

Opt-in (`extract --decode gpu`), not yet measured on a GPU: `--decode auto` decodes on the CPU
until `bench/device_check.py` has passed on one (`extract.config.GPU_DECODE_MEASURED`).
The device is a parameter: on 'cpu' the same pipeline runs libjpeg-turbo through the same
torchvision call, *without* EXIF orientation as CUDA does, which is how the tests compare it
with the PIL path (`data.ImageFiles`) on a machine without a GPU.

- `jpeg`: one scan of a JPEG's markers: may the device take it, and its EXIF orientation.
- `decoder`: the batched decode call; image errors fall back per image (bisection), out of
  memory / no nvJPEG / driver errors stop with one line; the decoders' identities for the cache.
- `loader`: `DeviceLoader`, reading, decoding and the network overlapped.

Known differences from the PIL path: PIL decodes large JPEGs at a reduced DCT scale
(`Preprocessing.draft_size`), the device at full size, and nvJPEG's chroma upsampling is not
libjpeg-turbo's; the cache records the decoder (`CacheConfig.decode`), so the two never mix.
"""

from ..extract.config import resolve_decode as _resolve_decode
from .decoder import BatchDecoder, device_identity, fatal_error, pil_identity
from .jpeg import JpegHeader, exif_orientation, orient, scan
from .loader import DecodeStats, DeviceLoader, read_file

__all__ = ["BatchDecoder", "DecodeStats", "DeviceLoader", "JpegHeader", "batch_decodable", "device_identity",
           "exif_orientation", "fatal_error", "orient", "pil_identity", "read_file", "resolve_decode", "scan"]


def resolve_decode(decode: str, device) -> str:
    """'cpu' or 'gpu' for a network on `device` (a torch.device); see `extract.config.resolve_decode`."""
    return _resolve_decode(decode, device.type)


def batch_decodable(data: bytes) -> bool:
    """True for a complete 1- or 3-channel JPEG (what nvJPEG takes)."""
    return scan(data).reason is None
