"""Builds a small test corpus: real photos (scikit-image's bundled images) in many modes and
formats, plus bad inputs of every kind, in every input format. Each record carries the
rejection reason the pipeline must give it (None = must be written), so tests compare exact
accounting against this independent list instead of against the pipeline's own report.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import skimage.data as sd
from PIL import Image

SIDE = 96  # small images keep the suite fast; big enough for the default checks


def _photo(name: str, side: int = SIDE) -> Image.Image:
    arr = getattr(sd, name)()
    im = Image.fromarray(arr)
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return im


def _save(im: Image.Image, path: str, fmt: str, **kw) -> None:
    im.save(path, fmt, **kw)


def make_images(d: str) -> dict[str, Optional[str]]:
    """Write the image files; return {file name: expected converted_from or None (original)}."""
    os.makedirs(d, exist_ok=True)
    rgb, cat, coffee, rocket = (
        _photo("astronaut"),
        _photo("chelsea"),
        _photo("coffee"),
        _photo("rocket"),
    )
    gray = _photo("camera")
    exif6, exif8 = Image.Exif(), Image.Exif()
    exif6[0x0112], exif8[0x0112] = 6, 8
    out: dict[str, Optional[str]] = {}

    def put(name, im, fmt, conv, **kw):
        _save(im, os.path.join(d, name), fmt, **kw)
        out[name] = conv

    put("rgb.jpg", rgb, "JPEG", None, quality=90)
    put("prog.jpg", coffee, "JPEG", None, quality=90, progressive=True)
    put("rgb.png", cat, "PNG", None)
    put("rgb.webp", rocket, "WEBP", None, quality=90)
    put("rot6.jpg", cat, "JPEG", None, quality=90, exif=exif6.tobytes())
    put("cmyk.jpg", rgb.convert("CMYK"), "JPEG", "JPEG/CMYK", quality=90)
    put("gray.jpg", gray, "JPEG", "JPEG/L", quality=90)
    put("gray.png", gray, "PNG", "PNG/L")
    g16 = Image.fromarray((np.asarray(gray, dtype=np.uint16) * 257))
    put("gray16.png", g16, "PNG", f"PNG/{Image.open(_buf(g16, 'PNG')).mode}")
    put("palette.png", cat.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", "PNG/P")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    put("rgba.png", rgba, "PNG", "PNG/RGBA")
    put("la.png", gray.convert("LA"), "PNG", "PNG/LA")
    put("alpha.webp", rgba, "WEBP", "WEBP/RGBA", lossless=True)
    put(
        "anim.gif",
        cat.convert("P"),
        "GIF",
        "GIF/P",
        save_all=True,
        append_images=[rgb.convert("P")],
        duration=100,
    )
    put("rgb.bmp", coffee, "BMP", "BMP/RGB")
    put("rgb.tif", rocket, "TIFF", "TIFF/RGB")
    put("rot8.png", coffee, "PNG", "PNG/RGB", exif=exif8.tobytes())
    # ---- bad files
    good = open(os.path.join(d, "rgb.jpg"), "rb").read()
    open(os.path.join(d, "zero.jpg"), "wb").close()
    with open(os.path.join(d, "trunc.jpg"), "wb") as f:
        f.write(good[: len(good) // 2])
    png = _buf(cat, "PNG").getvalue()
    with open(os.path.join(d, "corrupt.png"), "wb") as f:  # valid header, scrambled image data
        f.write(png[:60] + bytes(reversed(png[60:-40])) + png[-40:])
    with open(os.path.join(d, "notimage.jpg"), "w") as f:
        f.write("this is not an image\n")
    _save(rgb.resize((40, 12)), os.path.join(d, "tiny.jpg"), "JPEG")
    _save(Image.new("RGB", (1500, 1000), (20, 120, 200)), os.path.join(d, "huge.png"), "PNG")
    return out


def _buf(im: Image.Image, fmt: str) -> io.BytesIO:
    b = io.BytesIO()
    im.save(b, fmt)
    b.seek(0)
    return b


MIN_SIDE = 16
"""--min-image-side used with this corpus (tiny.jpg is 40x12)."""
MAX_PIXELS = 1_000_000
"""--max-image-pixels used with this corpus (huge.png is 1.5 MP)."""


@dataclass
class Corpus:
    root: str
    images: str
    inputs: list[str]
    converted: dict[str, Optional[str]]
    expected: dict[tuple[str, int], Optional[str]] = field(default_factory=dict)
    """(input file relative to root, line or index) -> expected reason (None = written)."""

    def expected_counts(self, dedup: bool = False) -> dict:
        reasons = [r for r in self.expected.values() if dedup or r != "duplicate"]
        rejected: dict[str, int] = {}
        for r in reasons:
            if r is not None:
                rejected[r] = rejected.get(r, 0) + 1
        written = sum(r is None for r in self.expected.values()) + (
            0 if dedup else sum(r == "duplicate" for r in self.expected.values())
        )
        return {"read": len(self.expected), "written": written, "rejected": rejected}


def make_corpus(root: str, n_text: int = 0) -> Corpus:
    images = os.path.join(root, "images")
    conv = make_images(images)
    c = Corpus(root, images, [], conv)
    good = sorted(conv)
    caps: list[tuple[object, Optional[str]]] = [
        ({"image": name, "text": f"a photo stored as {name}", "id": k}, None)
        for k, name in enumerate(good)
    ]
    caps += [
        ({"image": "missing.jpg", "text": "x"}, "missing_file"),
        ({"image": "zero.jpg", "text": "x"}, "zero_byte"),
        ({"image": "trunc.jpg", "text": "x"}, "corrupt_image"),
        ({"image": "corrupt.png", "text": "x"}, "corrupt_image"),
        ({"image": "notimage.jpg", "text": "x"}, "unsupported_format"),
        ({"image": "tiny.jpg", "text": "x"}, "image_too_small"),
        ({"image": "huge.png", "text": "x"}, "image_too_large"),
        ({"image": "rgb.jpg", "text": "   "}, "empty_text"),
        ("{not json", "malformed_json"),
        ([1, 2, 3], "malformed_record"),
        ({"image": "rgb.jpg", "text": "a photo stored as rgb.jpg", "id": 0}, "duplicate"),
    ]
    _write_jsonl(c, "captions.jsonl", caps)
    convs = [
        (
            {
                "image": "rgb.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWho is this?"},
                    {"from": "gpt", "value": "An astronaut."},
                    {"from": "human", "value": "Where?"},
                    {"from": "gpt", "value": "In a studio."},
                ],
            },
            None,
        ),
        (
            {
                "images": ["cmyk.jpg", "gray.png"],
                "conversations": [
                    {"from": "human", "value": "<image> vs <image>: which is gray?"},
                    {"from": "gpt", "value": "The second."},
                ],
            },
            None,
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "hi"},
                    {"from": "gpt", "value": "hello"},
                ]
            },
            None,
        ),
        (
            {
                "image": "rgb.jpg",
                "conversations": [
                    {"from": "human", "value": "no placeholder"},
                    {"from": "gpt", "value": "x"},
                ],
            },
            "placeholder_mismatch",
        ),
        (
            {
                "image": "rgb.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>"},
                    {"from": "gpt", "value": " "},
                ],
            },
            "empty_text",
        ),
    ]
    _write_json(c, "llava.json", convs)
    inter = [
        ({"images": ["rgb.png", "rot6.jpg"], "text": "First <image> then <image> end."}, None),
        (
            {
                "texts": ["Intro.", None, "Middle.", None],
                "images": [None, "rgb.webp", None, "anim.gif"],
            },
            None,
        ),
        (
            {"images": ["rgb.png", "rgb.jpg"], "text": "Only one <image> here."},
            "placeholder_mismatch",
        ),
        ({"images": ["rgb.png", "missing.png"], "text": "<image> and <image>"}, "missing_file"),
    ]
    _write_jsonl(c, "interleaved.jsonl", inter)
    texts = [
        ({"text": f"plain text document number {k} " * (1 + k % 5)}, None) for k in range(n_text)
    ] + [({"text": ""}, "empty_text")]
    _write_jsonl(c, "text.jsonl", texts)
    folder = os.path.join(root, "folder")
    os.makedirs(folder)
    for name, text in (("a.jpg", "folder caption a"), ("b.png", None), ("c.jpg", "  \n")):
        src = "rgb.jpg" if name.endswith("jpg") else "rgb.png"
        with (
            open(os.path.join(images, src), "rb") as f,
            open(os.path.join(folder, name), "wb") as g,
        ):
            g.write(f.read())
        if text is not None:
            with open(os.path.join(folder, name[:-4] + ".txt"), "w") as f:
                f.write(text)
    c.inputs.append(folder)
    c.expected[("folder/a.jpg", 0)] = None
    c.expected[("folder/b.png", 0)] = "missing_caption"
    c.expected[("folder/c.jpg", 0)] = "empty_text"
    return c


def _write_jsonl(c: Corpus, name: str, rows) -> None:
    path = os.path.join(c.root, name)
    with open(path, "w") as f:
        for k, (row, reason) in enumerate(rows):
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
            c.expected[(name, k + 1)] = reason
    c.inputs.append(path)


def _write_json(c: Corpus, name: str, rows) -> None:
    path = os.path.join(c.root, name)
    with open(path, "w") as f:
        json.dump([r for r, _ in rows], f, indent=1)
    for k, (_, reason) in enumerate(rows):
        c.expected[(name, k)] = reason
    c.inputs.append(path)


def source_id(src: dict) -> tuple[str, int]:
    """The (file, line/index) key of a `source` dict, matching Corpus.expected."""
    return src["file"], src.get("line", src.get("index", 0))
