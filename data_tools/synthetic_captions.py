"""navil-make-captions: a synthetic captioning set whose captions describe the images.

Each image shows one or two coloured shapes (circle, square, triangle) at named positions on a
plain background; its caption says exactly that ("a red circle at the top left and a blue square
at the bottom right."). A model that learns to caption these has learned to look: the quickstart
uses it to show the loss dropping and to caption a held-out image. Output: `images/*.png` and a
caption JSONL (`{"image": "images/000001.png", "text": ...}`) that navil-preprocess reads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

from PIL import Image, ImageDraw

from data_tools.cli_common import UsageError
from megatron_navil.utils.cli import run_cli

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 170),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "center": (0.5, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
BACKGROUNDS = ((20, 20, 20), (90, 90, 90))


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def make_sample(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    img = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    d = ImageDraw.Draw(img)
    n = rng.choice((1, 2))
    places = rng.sample(sorted(POSITIONS), n)
    parts = []
    for place in places:
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        fx, fy = POSITIONS[place]
        draw_shape(d, shape, fx * size, fy * size, size * 0.14, COLOURS[colour])
        parts.append(
            f"a {colour} {shape} at the {place}"
            if place != "center"
            else f"a {colour} {shape} in the center"
        )
    return img, " and ".join(parts) + "."


def write_set(out_dir: str, num: int, size: int, seed: int, name: str) -> str:
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = random.Random(seed)
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(num):
            img, caption = make_sample(rng, size)
            rel = f"images/{name}_{i:06d}.png"
            img.save(os.path.join(out_dir, rel))
            f.write(json.dumps({"image": rel, "text": caption}) + "\n")
    return path


def _main(argv) -> int:
    p = argparse.ArgumentParser(prog="navil-make-captions", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="directory for images/ and the JSONL files")
    p.add_argument("--num-train", type=int, default=800, help="training samples")
    p.add_argument("--num-valid", type=int, default=64, help="held-out samples (valid.jsonl)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)
    if a.size < 32 or a.num_train < 1 or a.num_valid < 0:
        raise UsageError(
            f"--size {a.size} --num-train {a.num_train} --num-valid {a.num_valid}: "
            "the size must be >= 32 px, --num-train >= 1 and --num-valid >= 0"
        )
    try:
        os.makedirs(os.path.join(a.output, "images"), exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output {a.output}: {e.strerror}") from None
    train = write_set(a.output, a.num_train, a.size, a.seed, "train")
    valid = write_set(a.output, a.num_valid, a.size, a.seed + 1, "valid") if a.num_valid else None
    print(json.dumps({"train": train, "valid": valid}))
    return 0


def main(argv=None) -> int:
    return run_cli(_main, argv, interrupted="interrupted; re-run the same command")


if __name__ == "__main__":
    sys.exit(main())
