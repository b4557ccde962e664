"""What the device decoder needs to know of a JPEG before decoding it, from one scan of its markers.

`scan` walks the marker segments up to the frame header: whether nvJPEG may take the file
(a complete 1- or 3-channel JPEG) and its EXIF orientation (APP1 "Exif", IFD0 tag 0x0112).
PIL's lazy `Image.open(...).getexif()` reads the same tag but costs ~70 us of Python per
image under the GIL; this scan is a few microseconds, which matters at thousands of img/s.
`orient` then turns a decoded uint8 (..., H, W) tensor the way `PIL.ImageOps.exif_transpose`
turns the image: torchvision's CUDA decoder ignores `apply_exif_orientation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers
_APP1 = 0xE1
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class JpegHeader:
    """`reason` is None when the batch decoder may take the file, else why it goes to the CPU path."""

    reason: str | None
    orientation: int = 1  # EXIF orientation 1-8 (1 = as stored)


def scan(data: bytes) -> JpegHeader:
    """Read the markers up to the frame header (see the module docstring)."""
    if len(data) < 4 or data[:3] != b"\xff\xd8\xff":
        return JpegHeader("not a JPEG")
    if data.rstrip(b"\0")[-2:] != b"\xff\xd9":  # truncated: to PIL, which refuses it, not to a grey-filling decoder
        return JpegHeader("no JPEG end marker (truncated?)")
    orientation = 1
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return JpegHeader("corrupt JPEG marker sequence")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == _APP1 and orientation == 1:
            orientation = exif_orientation(data[i + 4:i + 2 + length])
        if marker in _SOF:
            channels = data[i + 9]
            if channels not in (1, 3):
                return JpegHeader(f"{channels}-channel JPEG (CMYK/YCCK); the device decoder takes 1 or 3", orientation)
            return JpegHeader(None, orientation)
        i += 2 + length
    return JpegHeader("no JPEG frame header")


def exif_orientation(app1: bytes) -> int:
    """The orientation tag of an APP1 payload ("Exif\\0\\0" + TIFF), 1 when absent or malformed."""
    if app1[:6] != b"Exif\x00\x00":
        return 1
    tiff = app1[6:]
    order = {b"II": "little", b"MM": "big"}.get(bytes(tiff[:2]))
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            return 1
        if int.from_bytes(tiff[entry:entry + 2], order) == _ORIENTATION_TAG:
            value = int.from_bytes(tiff[entry + 8:entry + 10], order)  # SHORT, left-justified in the value field
            return value if 1 <= value <= 8 else 1
    return 1


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Undo EXIF `orientation` on a (..., H, W) tensor as `ImageOps.exif_transpose` does (a view
    where possible: flips copy, transposes do not)."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return img.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return img.transpose(-2, -1).flip(-2)
    return img
