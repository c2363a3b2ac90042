"""Image size from the encoded header, without decoding: the decompression-bomb guard.

A shard is untrusted input: an image whose header declares 60000 x 60000 pixels makes any
decoder allocate ~10 GB before it finds out the data is junk, and the index's recorded size
proves nothing (the index may lie). So before an image reaches DALI the loader reads the size
the decoder itself will use, from the header, and refuses the image when it has more pixels than
the limit (`image_pixel_limit`) or is not one of the formats navil-preprocess stores (JPEG, PNG,
WebP; docs/data_format.md). Anything else (BMP, TIFF, JPEG 2000, ...) is refused too: DALI would
decode those formats, but with sizes this check does not read.

navil-preprocess runs the same check on the bytes it stores (data_tools/images.py), so a sample
it wrote is never refused here for a header this parser reads differently from PIL.
"""

from __future__ import annotations

import struct
from typing import Optional

from megatron_navil.config.model import NaViLModelConfig

IMAGE_PIXEL_FACTOR = 16
"""Default training-time limit = this x the model's largest resized image
(max_dynamic_patch x patch_size^2): a source 4x the longest side the model ever sees. For the
released configs (24576 patches of 16 px) that is 100.7 MP, navil-preprocess's own default
limit (100 MP), ~300 MB of RGB to decode; for the debug flavors (1024 patches) 4.2 MP."""

# JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic).
# Not C4 (DHT), C8 (reserved) or CC (DAC), which share the range.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageHeaderError(ValueError):
    """The bytes do not start with a readable JPEG, PNG or WebP header."""


def image_pixel_limit(cfg: NaViLModelConfig, override: Optional[int] = None) -> int:
    """Most pixels (width x height, from the header) an image may have to be decoded."""
    if override is not None:
        return override
    return IMAGE_PIXEL_FACTOR * cfg.max_dynamic_patch * cfg.vision.patch_size**2


def header_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) as stored (before EXIF orientation); ImageHeaderError if the
    bytes are not a JPEG, PNG or WebP whose header gives a positive size."""
    if data[:3] == b"\xff\xd8\xff":
        fmt, (w, h) = "jpg", _jpeg_size(data)
    elif data[:8] == _PNG_SIGNATURE:
        fmt, (w, h) = "png", _png_size(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt, (w, h) = "webp", _webp_size(data)
    else:
        raise ImageHeaderError("not a JPEG, PNG or WebP header")
    if w <= 0 or h <= 0:
        raise ImageHeaderError(f"{fmt} header declares an empty size {w}x{h}")
    return fmt, w, h


def check_image_bytes(data: bytes, max_pixels: int) -> Optional[str]:
    """Why these encoded bytes must not be decoded (None: they may)."""
    try:
        fmt, w, h = header_size(data)
    except ImageHeaderError as e:
        return f"refused before decoding: {e}"
    if w * h > max_pixels:
        return (
            f"refused before decoding: {fmt} header declares {w}x{h} = {w * h} pixels, "
            f"more than the limit {max_pixels}"
        )
    return None


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk the marker segments up to the first scan; exactly one SOF must precede it (a second
    one could give a decoder another size than the one checked)."""
    pos, found = 2, None
    while True:
        if pos >= len(data) or data[pos] != 0xFF:
            raise ImageHeaderError("jpg header: a segment is not followed by a marker")
        while pos < len(data) and data[pos] == 0xFF:  # fill bytes before a marker code
            pos += 1
        if pos >= len(data):
            raise ImageHeaderError("jpg header is truncated")
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: the header is over
            break
        if pos + 2 > len(data):
            raise ImageHeaderError("jpg header is truncated")
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2 or pos + length > len(data):
            raise ImageHeaderError("jpg header has a segment longer than the file")
        if marker in _SOF:
            if found is not None:
                raise ImageHeaderError("jpg header has more than one frame header")
            if length < 8:
                raise ImageHeaderError("jpg frame header is truncated")
            h, w = struct.unpack(">HH", data[pos + 3 : pos + 7])
            if h == 0:  # height given later by a DNL marker: size unknown before decoding
                raise ImageHeaderError("jpg frame header defers its height (DNL)")
            found = (w, h)
        pos += length
    if found is None:
        raise ImageHeaderError("jpg header has no frame header")
    return found


def _png_size(data: bytes) -> tuple[int, int]:
    # The first chunk must be IHDR: 4-byte length 13, b"IHDR", width, height (big endian).
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageHeaderError("png header: first chunk is not IHDR")
    return struct.unpack(">II", data[16:24])


def _webp_size(data: bytes) -> tuple[int, int]:
    """Size of a still WebP: the VP8 (lossy) or VP8L (lossless) frame; with a VP8X extended
    header, its canvas must equal that frame (an animation is refused: we never store one)."""
    canvas, pos = None, 12
    while pos + 8 <= len(data):
        tag = data[pos : pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        body = data[pos + 8 : pos + 8 + size]
        if tag == b"VP8X" and len(body) >= 10:
            if body[0] & 0x02:
                raise ImageHeaderError("webp is animated")
            canvas = (
                1 + int.from_bytes(body[4:7], "little"),
                1 + int.from_bytes(body[7:10], "little"),
            )
        elif tag in (b"VP8 ", b"VP8L"):
            frame = _vp8_size(body) if tag == b"VP8 " else _vp8l_size(body)
            if canvas is not None and canvas != frame:
                raise ImageHeaderError(f"webp canvas {canvas} differs from its frame {frame}")
            return frame
        pos += 8 + size + (size & 1)  # chunks are padded to even sizes
    raise ImageHeaderError("webp header has no VP8/VP8L frame")


def _vp8_size(body: bytes) -> tuple[int, int]:
    if len(body) < 10 or body[3:6] != b"\x9d\x01\x2a":
        raise ImageHeaderError("webp VP8 frame header is invalid")
    w, h = struct.unpack("<HH", body[6:10])
    return w & 0x3FFF, h & 0x3FFF  # the top 2 bits are the upscaling hint


def _vp8l_size(body: bytes) -> tuple[int, int]:
    if len(body) < 5 or body[0] != 0x2F:
        raise ImageHeaderError("webp VP8L frame header is invalid")
    bits = int.from_bytes(body[1:5], "little")
    return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
