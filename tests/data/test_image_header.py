"""The pre-decode image check (megatron_navil/data/image_header.py): sizes from headers only.

Proves: the size read from the header equals PIL's (an independent reader) for every kind of
JPEG, PNG and WebP navil-preprocess stores (baseline, progressive, large APP segments, EXIF,
lossy, lossless, alpha); a PNG whose IHDR declares 30000 x 30000 (made by patching a small PNG,
CRC recomputed, so no large image is ever allocated) and a JPEG whose frame header declares
60000 x 60000 are refused with the declared size, without decoding; formats we never store
(GIF, BMP, TIFF) and ambiguous JPEG headers (two frame headers, a DNL-deferred height) are
refused; the default training limit is 16 x the model's largest resized image, which for the
released configs is navil-preprocess's own default (100 MP).
"""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from megatron_navil.config import get_flavor
from megatron_navil.data.image_header import (
    ImageHeaderError,
    check_image_bytes,
    header_size,
    image_pixel_limit,
)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(size=(123, 45), mode="RGB") -> Image.Image:
    im = Image.linear_gradient("L").resize(size).convert(mode)
    return im


@pytest.mark.parametrize(
    "fmt, mode, kw",
    [
        ("JPEG", "RGB", {}),
        ("JPEG", "RGB", {"progressive": True}),
        ("JPEG", "RGB", {"icc_profile": b"p" * 150_000}),  # ICC split over 3 APP2 segments
        ("JPEG", "L", {}),
        ("PNG", "RGB", {}),
        ("PNG", "RGBA", {}),
        ("WEBP", "RGB", {}),
        ("WEBP", "RGB", {"lossless": True}),
        ("WEBP", "RGBA", {}),  # VP8X + ALPH + VP8
        ("WEBP", "RGBA", {"lossless": True}),
    ],
)
def test_header_size_equals_pil(fmt, mode, kw):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored size is reported, as PIL's .size does
    if fmt == "JPEG":
        kw = {**kw, "exif": exif.tobytes()}
    data = _encode(_photo(mode=mode), fmt, **kw)
    with Image.open(io.BytesIO(data)) as im:
        assert header_size(data)[1:] == im.size == (123, 45)
    assert check_image_bytes(data, 123 * 45) is None
    assert "more than the limit" in check_image_bytes(data, 123 * 45 - 1)


def _png_declaring(width: int, height: int) -> bytes:
    data = bytearray(_encode(_photo((8, 8)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_png_bomb_is_refused_from_its_header(monkeypatch):
    bomb = _png_declaring(30000, 30000)
    assert len(bomb) < 1000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own guard would refuse to open
    with Image.open(io.BytesIO(bomb)) as im:  # PIL reads the same declared size
        assert im.size == (30000, 30000)
    why = check_image_bytes(bomb, 100_000_000)
    assert "png header declares 30000x30000 = 900000000 pixels" in why
    assert "more than the limit 100000000" in why
    assert check_image_bytes(bomb, 900_000_000) is None  # the limit is the only thing refusing


def test_jpeg_bomb_is_refused_from_its_header():
    data = bytearray(_encode(_photo(), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    assert "60000x60000" in check_image_bytes(bytes(data), 100_000_000)


def test_formats_we_never_store_and_ambiguous_jpegs_are_refused():
    for fmt in ("GIF", "BMP", "TIFF"):
        why = check_image_bytes(_encode(_photo(), fmt), 10**9)
        assert why == "refused before decoding: not a JPEG, PNG or WebP header", fmt
    data = _encode(_photo(), "JPEG")
    sof = data.index(b"\xff\xc0")
    length = struct.unpack(">H", data[sof + 2 : sof + 4])[0]
    segment = data[sof : sof + 2 + length]
    with pytest.raises(ImageHeaderError, match="more than one frame header"):
        header_size(data[:sof] + segment + data[sof:])
    dnl = bytearray(data)
    dnl[sof + 5 : sof + 7] = b"\x00\x00"
    with pytest.raises(ImageHeaderError, match="DNL"):
        header_size(bytes(dnl))
    with pytest.raises(ImageHeaderError):
        header_size(data[:20])  # truncated before the frame header


def test_default_limit_follows_the_model_config():
    cfg = get_flavor("navil-2b")
    assert image_pixel_limit(cfg) == 16 * 24576 * 16 * 16 == 100_663_296
    assert image_pixel_limit(get_flavor("debug-internlm2")) == 16 * 1024 * 256
    assert image_pixel_limit(cfg, override=123) == 123
