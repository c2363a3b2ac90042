"""Validate one image: read, fully decode once, and choose the bytes to store.

Policy (docs/data_format.md, "Stored images"): the bytes stored are always decodable by DALI's
`fn.decoders.image` into 8-bit RGB.
- Original bytes are kept for 8-bit RGB JPEG (any EXIF orientation), 8-bit RGB PNG and RGB WebP
  (still, no alpha) with EXIF orientation 1.
- Everything else PIL can decode (CMYK/YCCK or grayscale JPEG, 16-bit, palette, alpha,
  grayscale, GIF/BMP/TIFF/...) is converted to RGB with orientation applied ("baked"): lossless
  sources to PNG, lossy sources (JPEG, lossy WebP, MPO) to JPEG quality 95 with 4:4:4 chroma.
  Alpha is composited on white. `converted_from` records "<FORMAT>/<mode>".
Width/height are always the size AFTER EXIF orientation, i.e. what DALI's decoder (its default
`adjust_orientation=True`) and PIL + `ImageOps.exif_transpose` return.
Original bytes are kept only if the training loader's own pre-decode check
(megatron_navil/data/image_header.py) reads their header as PIL does; a file whose header it
cannot read (e.g. junk between JPEG markers, which decoders tolerate) is converted instead, so
the loader never refuses a sample this tool wrote.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from data_tools.samples import Reject

if TYPE_CHECKING:
    from data_tools.shards import SpoolRef
from megatron_navil.data.image_header import ImageHeaderError, header_size

# We enforce our own pixel limit before decoding; PIL's global guard would raise at 2x its
# default and warn below it, with a different threshold than the user asked for.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode grey

_ORIENTATION_TAG = 0x0112
_LOSSY = {"JPEG", "MPO"}
# EXIF orientation -> the transpose that displays the image upright (the EXIF 2.3 table).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
JPEG_QUALITY = 95
"""Quality of re-encoded lossy sources (high enough that conversion adds no visible loss)."""


@dataclass
class ImageLimits:
    """Validation limits for one image."""

    min_side: int = 32
    """Reject images whose shorter side is below this many pixels (`image_too_small`)."""
    max_pixels: int = 100_000_000
    """Reject images with more pixels than this before decoding them (`image_too_large`,
    the decompression-bomb guard: a 100 MP RGB image needs ~300 MB to decode)."""


@dataclass
class StoredImage:
    """What goes into the shard for one image, plus its index metadata."""

    data: Union[bytes, "SpoolRef"]
    """Bytes written to the tar member; once the worker has spooled them, where they are
    (data_tools.shards.SpoolRef: the parent never receives image bytes)."""
    ext: str
    """Member extension: jpg | png | webp."""
    width: int
    """Width after EXIF orientation."""
    height: int
    """Height after EXIF orientation."""
    orientation: int
    """EXIF orientation (1-8) of the STORED bytes; the decoder applies it. 1 if converted."""
    source_format: str
    """PIL format name of the input file (JPEG, PNG, WEBP, GIF, ...)."""
    converted_from: Optional[str]
    """"<FORMAT>/<mode>" when converted, else None (original bytes stored)."""
    digest: str
    """blake2b-128 hex of the ORIGINAL input bytes (used by --dedup)."""


def read_image(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise Reject("missing_file", f"{path} not found") from None
    except IsADirectoryError:
        raise Reject("missing_file", f"{path} is a directory") from None
    except PermissionError:
        raise Reject("unreadable_file", f"{path}: permission denied") from None
    if not data:
        raise Reject("zero_byte", f"{path} is empty")
    return data


def process_image(path: str, limits: ImageLimits) -> StoredImage:
    """Load, validate and (if needed) convert one image. Raises Reject with a reason code."""
    data = read_image(path)
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Reject("unsupported_format", "not an image format PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # a known format with a broken header
        raise Reject("corrupt_image", f"header: {e}") from None
    fmt = im.format or "UNKNOWN"
    w, h = im.size
    if w * h > limits.max_pixels:
        raise Reject(
            "image_too_large", f"{w}x{h} = {w * h} pixels > --max-image-pixels {limits.max_pixels}"
        )
    if min(w, h) < limits.min_side:
        raise Reject(
            "image_too_small", f"{w}x{h}: shorter side < --min-image-side {limits.min_side}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd-but-decodable metadata
            im.load()  # the one full decode: truncation and corrupt data raise here
    except Exception as e:  # any decoder failure is this image's fault, never the job's
        raise Reject("corrupt_image", f"decode failed: {type(e).__name__}: {e}") from None
    # NOTE: only after the full decode: PNG's getexif() loads the image itself, and a decode
    # error swallowed there would let a corrupt file through.
    orientation = _orientation(im)
    if _keep_original(im, fmt, data, orientation) and _loader_reads(data, (w, h)):
        ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        return StoredImage(data, ext, ow, oh, orientation, fmt, None, digest)
    converted_from = f"{fmt}/{im.mode}"
    rgb = _to_rgb(im)
    if orientation != 1:
        rgb = rgb.transpose(_TRANSPOSE[orientation])  # bake it: the stored bytes carry no EXIF
    lossy = fmt in _LOSSY or (fmt == "WEBP" and not _webp_lossless(data))
    buf = io.BytesIO()
    if lossy:
        rgb.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)
        ext = "jpg"
    else:
        rgb.save(buf, "PNG", compress_level=1)  # fast: shards are not the place to save bytes
        ext = "png"
    return StoredImage(buf.getvalue(), ext, rgb.width, rgb.height, 1, fmt, converted_from, digest)


def _loader_reads(data: bytes, size: tuple[int, int]) -> bool:
    """Does the loader's header check read the size PIL read (so it will decode these bytes)?"""
    try:
        return header_size(data)[1:] == size
    except ImageHeaderError:
        return False


def _orientation(im: Image.Image) -> int:
    try:
        o = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # broken EXIF must not reject an otherwise good image
        return 1
    return o if 1 <= o <= 8 else 1


def _keep_original(im: Image.Image, fmt: str, data: bytes, orientation: int) -> bool:
    if im.mode != "RGB" or getattr(im, "n_frames", 1) != 1:
        return False
    if fmt == "JPEG":
        return True  # DALI applies JPEG EXIF orientation itself (verified in the tests)
    if orientation != 1:
        return False  # bake orientation for non-JPEG: decoders disagree on PNG/WebP EXIF
    if fmt == "PNG":
        # IHDR bit depth at byte 24: 16-bit RGB opens as mode RGB in PIL but is not 8-bit.
        return data[24] == 8 and "transparency" not in im.info
    return fmt == "WEBP"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; alpha composited on white, 16/32-bit scaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(np.round(a * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if im.mode == "P" and "transparency" in im.info or im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _webp_lossless(data: bytes) -> bool:
    # RIFF....WEBPVP8L = lossless; VP8X (extended) holds either: look for a VP8L chunk.
    return data[12:16] == b"VP8L" or (data[12:16] == b"VP8X" and b"VP8L" in data[:4096])
