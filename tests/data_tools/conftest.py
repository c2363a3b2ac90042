"""Fixtures for data_tools tests: one corpus + one reference preprocessing run per session
(images are small, so building them takes about a second)."""

from __future__ import annotations

import pytest

from tests.data_tools.corpus import MAX_PIXELS, MIN_SIDE, make_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("corpus")), n_text=40)


def preprocess_args(corpus, out: str, *extra: str) -> list[str]:
    return [
        "--input",
        *corpus.inputs,
        "--output",
        out,
        "--image-root",
        corpus.images,
        "--min-image-side",
        str(MIN_SIDE),
        "--max-image-pixels",
        str(MAX_PIXELS),
        "--samples-per-shard",
        "4",
        "--log-every",
        "1000",
        *extra,
    ]


@pytest.fixture(scope="session")
def reference_run(corpus, tmp_path_factory):
    """A single-partition run with --dedup and 2 workers: the reference other tests compare to."""
    from data_tools.preprocess import main

    out = str(tmp_path_factory.mktemp("ref"))
    assert main(preprocess_args(corpus, out, "--dedup", "--num-workers", "2")) == 0
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A ~500-piece sentencepiece tokenizer trained on the fly on a few hundred captions."""
    from megatron_navil.data.tokenizer import train_sentencepiece

    words = (
        "a photo of the astronaut cat coffee cup rocket camera man standing near with "
        "red blue green small large image picture showing on in at day night"
    ).split()
    texts = [
        " ".join(words[(7 * k + j * 3) % len(words)] for j in range(6 + k % 9)) + "."
        for k in range(300)
    ]
    tok = train_sentencepiece(texts, vocab_size=500)
    d = str(tmp_path_factory.mktemp("tok"))
    tok.save(d)
    return d
