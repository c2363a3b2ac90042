"""Test data for the loader: real shards made by navil-preprocess from scikit-image photos.

Every sample kind is present (caption, conversation with one and two images, text-only
conversation, interleaved, plain text of several lengths, one text longer than the test
seq_length) so the loader runs all its code paths on the on-disk format it will meet in
production. Images are small (48-240 px sides) to keep the suite fast.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np
import skimage.data as sd
from PIL import Image

from megatron_navil.config import get_flavor

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "camera")
WORDS = (
    "a photo of the astronaut cat coffee cup rocket camera man standing near with red blue "
    "green small large image picture showing on in at day night sky space"
).split()


def photo(name: str, size: tuple[int, int]) -> Image.Image:
    """A scikit-image photo resized to (width, height), RGB."""
    im = Image.fromarray(getattr(sd, name)()).convert("RGB")
    return im.resize(size, Image.Resampling.LANCZOS)


def jpeg_bytes(im: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def sentence(k: int, n: int) -> str:
    return " ".join(WORDS[(7 * k + 3 * j) % len(WORDS)] for j in range(n)) + "."


def train_tokenizer(directory: str):
    from megatron_navil.data.tokenizer import NaViLTokenizer, train_sentencepiece

    texts = [sentence(k, 5 + k % 11) for k in range(400)]
    tok = train_sentencepiece(texts, vocab_size=500)
    tok.save(directory)
    return NaViLTokenizer.load(directory)


def model_config(tok, flavor: str = "debug-internlm2"):
    """A flavor with the test tokenizer's vocabulary (special ids must agree)."""
    cfg = get_flavor(flavor)
    return cfg.replace(
        llm=cfg.llm.replace(
            vocab_size=tok.vocab_size, first_special_token_id=tok.first_special_token_id
        )
    )


@dataclass
class Corpus:
    root: str
    records: list[dict]


def make_records(
    images_dir: str, n_captions: int, n_text: int, long_text_words: int, seed: int = 0
) -> list[dict]:
    """Write images; return JSONL records (navil-preprocess input)."""
    os.makedirs(images_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for k in range(max(n_captions, 4)):
        w, h = int(rng.integers(48, 240)), int(rng.integers(48, 240))
        name = f"img{k:03d}.jpg"
        photo(PHOTOS[k % len(PHOTOS)], (w, h)).save(os.path.join(images_dir, name), quality=92)
        names.append(name)
    recs: list[dict] = [
        {"image": names[k], "text": sentence(k, 4 + k % 9)} for k in range(n_captions)
    ]
    recs += [
        {
            "image": names[0],
            "conversations": [
                {"from": "human", "value": "<image>\nwhat is in the picture?"},
                {"from": "gpt", "value": "a man standing near a rocket."},
                {"from": "human", "value": "and the sky?"},
                {"from": "gpt", "value": "blue."},
            ],
        },
        {
            "images": [names[1], names[2]],
            "conversations": [
                {"from": "human", "value": "<image> or <image>: which shows a cat?"},
                {"from": "gpt", "value": "the second image."},
            ],
        },
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"images": [names[3], names[1]], "text": "first <image> then the cup <image> at night."},
    ]
    recs += [{"text": sentence(100 + k, 3 + 5 * (k % 6))} for k in range(n_text)]
    recs.append({"text": sentence(999, long_text_words)})
    return recs


def make_dataset(
    root: str,
    tokenizer_dir: str,
    n_captions: int = 16,
    n_text: int = 12,
    long_text_words: int = 400,
    samples_per_shard: int = 8,
    chat_template: str = "internlm2",
) -> Corpus:
    """Preprocess a fresh corpus into `root/shards` with the real navil-preprocess."""
    recs = make_records(os.path.join(root, "images"), n_captions, n_text, long_text_words)
    return preprocess(root, recs, tokenizer_dir, samples_per_shard, chat_template)


def preprocess(
    root: str,
    recs: list[dict],
    tokenizer_dir: str,
    samples_per_shard: int = 8,
    chat_template: str = "internlm2",
) -> Corpus:
    """Run navil-preprocess on `recs` (images under `root/images`) into `root/shards`."""
    from data_tools.preprocess import main

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "data.jsonl"), "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    out = os.path.join(root, "shards")
    rc = main(
        [
            "--input",
            os.path.join(root, "data.jsonl"),
            "--output",
            out,
            "--image-root",
            os.path.join(root, "images"),
            "--tokenizer",
            tokenizer_dir,
            "--chat-template",
            chat_template,
            "--samples-per-shard",
            str(samples_per_shard),
            "--num-workers",
            "1",
            "--min-image-side",
            "16",
            "--log-every",
            "1000",
        ]
    )
    assert rc == 0
    return Corpus(out, recs)


def all_index_samples(root: str) -> list[dict]:
    with open(os.path.join(root, "manifest.json")) as f:
        manifest = json.load(f)
    out = []
    for sh in manifest["shards"]:
        with open(os.path.join(root, sh["index"])) as f:
            out += json.load(f)["samples"]
    return out


def epochs(loader, n: int):
    """(batches of the loader's first n epochs, its counters after the last of them)."""
    out, counters = [], loader.counters
    while True:
        batch = next(loader)
        if batch.metadata["epoch"] >= n:
            return out, counters
        out.append(batch)
        counters = loader.counters


def reindex(root: str) -> None:
    """Rebuild `root/index/` (the binary index) from its JSON indexes, as a user would after
    editing them: `navil-preprocess --reindex root`."""
    from data_tools.preprocess import main

    assert main(["--reindex", root, "--num-workers", "0"]) == 0


def drop_binary_index(root: str) -> None:
    """Make `root` an output from before the binary index: the loader reads its JSON indexes."""
    import shutil

    shutil.rmtree(os.path.join(root, "index"))
