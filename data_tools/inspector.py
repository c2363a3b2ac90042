"""navil-inspect: statistics of a preprocessed dataset, and renderings of chosen samples.

    navil-inspect shards/                          # table: counts, histograms, rejects
    navil-inspect shards/ --json stats.json        # the same, machine-readable
    navil-inspect shards/ --render 5 --render-dir look/    # 5 samples -> PNGs + index.html
    navil-inspect shards/ --keys p00000-000000-000003 --render-dir look/

Reads only the per-shard indexes for statistics (no decoding), and sample bytes by their
recorded offsets for rendering, exactly as the training loader does, with the loader's checks
on untrusted shards (megatron_navil/data/members.py, image_header.py): a sample with an unsafe
key, a tar member that is not the regular file its index names (link, device, absolute or
`..` name) or an image header over the pixel limit is not rendered; the summary lists it with
the reason (naming the tar file and member).
"""

from __future__ import annotations

import argparse
import glob
import html
import io
import json
import os
import random
import textwrap
from collections import Counter
from typing import Any, Optional, Sequence

from data_tools.cli_common import UsageError, format_table, write_text
from megatron_navil.data.image_header import check_image_bytes
from megatron_navil.data.index import ShardReader
from megatron_navil.data.members import UnsafeMember, safe_file_name, safe_key
from megatron_navil.utils.cli import run_cli
from megatron_navil.utils.files import atomic_writer, write_json_atomic
from megatron_navil.utils.logging import get_logger

logger = get_logger(__name__)

SIDE_EDGES = (64, 256, 512, 1024, 2048, 4096)
"""Bucket edges (pixels) of the longer-side histogram."""
TOKEN_EDGES = (16, 64, 256, 1024, 4096, 16384)
"""Bucket edges of the text-token histogram."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="navil-inspect",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dataset", help="output directory of navil-preprocess")
    p.add_argument("--json", default=None, help="also write the statistics to this JSON file")
    p.add_argument(
        "--render",
        type=int,
        default=0,
        help="render this many randomly chosen samples (see --seed)",
    )
    p.add_argument("--keys", nargs="+", default=[], help="render these sample keys")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample choice")
    p.add_argument(
        "--render-dir", default=None, help="where renderings go (default: <dataset>/render)"
    )
    return p


def load_indexes(dataset: str) -> list[dict[str, Any]]:
    """All committed segment indexes, in (partition, segment) order."""
    paths = sorted(glob.glob(os.path.join(dataset, "shard-p*-*.index.json")))
    out = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            out.append(json.load(f))
    return out


def _hist(values: Sequence[int], edges: Sequence[int]) -> dict[str, int]:
    labels = [f"<{edges[0]}"] + [f"{a}-{b}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]}"]
    counts = Counter()
    for v in values:
        k = sum(v >= e for e in edges)
        counts[labels[k]] += 1
    return {lab: counts[lab] for lab in labels}


def compute_stats(dataset: str, segs: list[dict[str, Any]]) -> dict[str, Any]:
    samples = [s for seg in segs for s in seg["samples"]]
    sides = [max(im["width"], im["height"]) for s in samples for im in s["images"]]
    tokens = [s["text_tokens"] for s in samples if s.get("text_tokens") is not None]
    rejected: Counter = Counter()
    for seg in segs:
        rejected.update(seg["counts"]["rejected"])
    return {
        "dataset": os.path.abspath(dataset),
        "complete": os.path.isfile(os.path.join(dataset, "manifest.json")),
        "shards": sum(1 for seg in segs if seg["tar"]),
        "tar_bytes": sum(seg["tar_bytes"] for seg in segs),
        "read": sum(seg["counts"]["read"] for seg in segs),
        "samples": len(samples),
        "images": len(sides),
        "kinds": dict(Counter(s["kind"] for s in samples)),
        "images_per_sample": dict(sorted(Counter(s["num_images"] for s in samples).items())),
        "converted": dict(
            Counter(
                im["converted_from"] for s in samples for im in s["images"] if im["converted_from"]
            )
        ),
        "image_longer_side": _hist(sides, SIDE_EDGES),
        "text_tokens": _hist(tokens, TOKEN_EDGES) if tokens else None,
        "text_tokens_total": sum(tokens) if tokens else None,
        "rejected": dict(sorted(rejected.items())),
    }


def stats_text(st: dict[str, Any]) -> str:
    rows = [
        ["samples", st["samples"]],
        ["images", st["images"]],
        ["shards", st["shards"]],
        ["GiB", f"{st['tar_bytes'] / 2**30:.3f}"],
        ["records read", st["read"]],
    ]
    rows += [[f"kind: {k}", v] for k, v in sorted(st["kinds"].items())]
    rows += [[f"images/sample = {k}", v] for k, v in st["images_per_sample"].items()]
    rows += [[f"converted from {k}", v] for k, v in sorted(st["converted"].items())]
    rows += [[f"longer side {k} px", v] for k, v in st["image_longer_side"].items()]
    if st["text_tokens"]:
        rows += [[f"text tokens {k}", v] for k, v in st["text_tokens"].items()]
    rows += [[f"rejected: {k}", v] for k, v in st["rejected"].items()]
    status = "complete" if st["complete"] else "INCOMPLETE (no manifest.json: partitions running?)"
    return format_table(rows, [f"{st['dataset']} [{status}]", "count"])


def read_member(dataset: str, seg: dict[str, Any], sample: dict[str, Any], member: str) -> bytes:
    """Bytes of one member of a sample, by the offset the index records, after checking the
    tar header before them (UnsafeMember otherwise)."""
    if not safe_file_name(seg.get("tar")):
        raise UnsafeMember(f"shard index names tar {seg.get('tar')!r}, not a file in {dataset}")
    offset, size = sample["members"][member]
    with ShardReader([os.path.join(dataset, seg["tar"])]) as reader:
        return reader.read_member(0, offset, size, f"{sample['key']}.{member}")


def _load_sample(dataset: str, seg: dict, s: dict, max_pixels: int) -> tuple[dict, list[bytes]]:
    """(the sample's JSON, its images' bytes), or UnsafeMember saying why it is refused."""
    if not safe_key(s.get("key")):
        raise UnsafeMember(f"sample key {s.get('key')!r} is not [A-Za-z0-9_-]")
    doc = json.loads(read_member(dataset, seg, s, "json"))
    images = []
    for im in s["images"]:
        data = read_member(dataset, seg, s, im["member"])
        why = check_image_bytes(data, max_pixels)
        if why is not None:
            raise UnsafeMember(f"image {s['key']}.{im['member']} {why}")
        images.append(data)
    return doc, images


def render(
    dataset: str,
    segs: list[dict[str, Any]],
    chosen: list[tuple[dict, dict]],
    out_dir: str,
    max_pixels: int = 100_000_000,
) -> tuple[list[str], list[str]]:
    """One PNG per sample (images side by side over the wrapped text) + index.html; returns
    (written PNG paths, one line per refused sample). `max_pixels`: images whose header
    declares more are not decoded (the dataset's --max-image-pixels)."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    os.makedirs(out_dir, exist_ok=True)
    font = ImageFont.load_default()
    cards, written, refused = [], [], []
    for seg, s in chosen:
        try:
            doc, datas = _load_sample(dataset, seg, s, max_pixels)
        except (UnsafeMember, ValueError) as e:  # ValueError: JSON that does not parse
            refused.append(f"refused {s.get('key')!r}: {e}")
            continue
        ims = []
        for data in datas:
            pic = Image.open(io.BytesIO(data))
            pic = ImageOps.exif_transpose(pic).convert("RGB")
            pic.thumbnail((384, 384))
            ims.append(pic)
        text = doc.get("text") or "\n".join(
            f"[{t['role']}] {t['content']}" for t in doc.get("conversations", [])
        )
        lines = [ln for para in text.splitlines() for ln in (textwrap.wrap(para, 100) or [""])]
        lines = lines[:40]
        width = max(800, sum(p.width + 8 for p in ims))
        top = max((p.height for p in ims), default=0)
        canvas = Image.new("RGB", (width, top + 24 + 14 * len(lines) + 8), "white")
        x = 0
        for p in ims:
            canvas.paste(p, (x, 0))
            x += p.width + 8
        draw = ImageDraw.Draw(canvas)
        draw.text(
            (4, top + 4),
            f"{s['key']} ({s['kind']}, {s['num_images']} image(s))",
            fill="black",
            font=font,
        )
        for k, ln in enumerate(lines):
            draw.text((4, top + 22 + 14 * k), ln, fill=(40, 40, 40), font=font)
        path = os.path.join(out_dir, f"{s['key']}.png")
        canvas.save(path)
        written.append(path)
        meta = json.dumps({k: v for k, v in s.items() if k != "members"}, indent=1)
        cards.append(
            f'<div><h3>{html.escape(s["key"])}</h3><img src="{s["key"]}.png">'
            f"<pre>{html.escape(text)}</pre><details><summary>index entry</summary>"
            f"<pre>{html.escape(meta)}</pre></details></div>"
        )
    with atomic_writer(os.path.join(out_dir, "index.html")) as f:
        f.write(
            "<!doctype html><meta charset=utf-8><title>navil-inspect</title>"
            "<style>img{max-width:100%}pre{white-space:pre-wrap}</style>\n"
            + "\n<hr>\n".join(cards)
            + "\n"
        )
    return written, refused


def _max_pixels(dataset: str) -> int:
    """The dataset's --max-image-pixels (manifest or a partition report), else the default."""
    from data_tools.images import ImageLimits

    for name in [
        "manifest.json",
        *sorted(glob.glob(os.path.join(dataset, "partitions", "*.json"))),
    ]:
        try:
            with open(os.path.join(dataset, name), encoding="utf-8") as f:
                value = json.load(f)["settings"]["max_image_pixels"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, int) and value > 0:
            return value
    return ImageLimits.max_pixels


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    a = build_parser().parse_args(argv)
    if not os.path.isdir(a.dataset):
        raise UsageError(f"{a.dataset!r} is not a directory; pass the --output of navil-preprocess")
    segs = load_indexes(a.dataset)
    if not segs:
        raise UsageError(
            f"{a.dataset!r} holds no shard index (*.index.json); is it the "
            "--output of navil-preprocess?"
        )
    st = compute_stats(a.dataset, segs)
    text = stats_text(st)
    if a.json:
        write_json_atomic(a.json, st, indent=1)
    if a.render or a.keys:
        by_key = {s["key"]: (seg, s) for seg in segs for s in seg["samples"]}
        missing = [k for k in a.keys if k not in by_key]
        if missing:
            raise UsageError(f"no sample with key(s) {', '.join(missing)} in {a.dataset}")
        chosen = [by_key[k] for k in a.keys]
        if a.render:
            pool = sorted(by_key)
            chosen += [
                by_key[k] for k in random.Random(a.seed).sample(pool, min(a.render, len(pool)))
            ]
        out = a.render_dir or os.path.join(a.dataset, "render")
        paths, refused = render(a.dataset, segs, chosen, out, _max_pixels(a.dataset))
        text += f"\nrendered {len(paths)} sample(s) to {out}/ (open index.html)"
        text += "".join(f"\n{line}" for line in refused)
    write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
