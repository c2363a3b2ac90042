"""navil-pretrain's model vocabulary follows the tokenizer it trains with.

`PretrainConfig.resolved_model(configured_vocabulary(tokenizer))` (what navil-pretrain's
parse_config and Trainer call) takes llm.first_special_token_id and llm.vocab_size from the
tokenizer (a navil-tokenizer directory or a bare sentencepiece .model), so runs need no
`model.llm.vocab_size=... model.llm.first_special_token_id=...` by hand; a flavor whose special
tokens already sit where the tokenizer puts them keeps its (larger, padded) embedding rows, as
Qwen3's 151936 rows for a 151681-id tokenizer; an explicit override that agrees is kept, one that
contradicts is one ConfigError naming both values. Exact integer comparisons.
"""

from __future__ import annotations

import pytest

from megatron_navil.config.base import ConfigError
from megatron_navil.config.pretrain import PretrainConfig
from megatron_navil.data.tokenizer import configured_vocabulary, train_sentencepiece

WORDS = "a photo of the cat cup rocket camera man near with red blue green small large day".split()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    texts = [
        " ".join(WORDS[(5 * k + j) % len(WORDS)] for j in range(5 + k % 7)) for k in range(200)
    ]
    d = tmp_path_factory.mktemp("tok")
    tok = train_sentencepiece(texts, vocab_size=320)
    tok.save(str(d))
    return d, tok


class _Job(PretrainConfig):
    def resolve(self):
        return self.resolved_model(configured_vocabulary(self.tokenizer))


def _cfg(tokenizer, **model_fields) -> PretrainConfig:
    c = _Job(mock_data=True, tokenizer=str(tokenizer))
    return c.apply_overrides({f"model.{k}": v for k, v in model_fields.items()})


def test_vocabulary_comes_from_the_tokenizer(tok_dir):
    d, tok = tok_dir
    for path in (d, d / "tokenizer.model"):  # a directory, or the bare sentencepiece model
        llm = _cfg(path).resolve().llm
        assert (llm.vocab_size, llm.first_special_token_id) == (
            tok.vocab_size,
            tok.first_special_token_id,
        )
    assert tok.vocab_size < 512  # the debug flavor's default really is overridden
    _cfg(d).validate()


def test_agreeing_overrides_are_kept_and_padding_rows_allowed(tok_dir):
    d, tok = tok_dir
    llm = (
        _cfg(
            d,
            **{
                "llm.first_special_token_id": tok.first_special_token_id,
                "llm.vocab_size": tok.vocab_size + 40,
            },
        )
        .resolve()
        .llm
    )
    assert (llm.vocab_size, llm.first_special_token_id) == (
        tok.vocab_size + 40,
        tok.first_special_token_id,
    )
    # a model whose special tokens sit where the tokenizer has them keeps its padded rows
    # (the debug flavor's 512, like Qwen3's 151936 for 151681 ids)
    llm = _cfg(d, **{"llm.first_special_token_id": tok.first_special_token_id}).resolve().llm
    assert llm.vocab_size == 512


def test_contradictions_are_one_clear_error(tok_dir):
    d, tok = tok_dir
    with pytest.raises(
        ConfigError,
        match=rf"first_special_token_id=500 contradicts .* start at "
        rf"{tok.first_special_token_id}",
    ):
        _cfg(d, **{"llm.first_special_token_id": 500}).resolve()
    with pytest.raises(
        ConfigError, match=rf"vocab_size=10 is smaller than .*\({tok.vocab_size} ids\)"
    ):
        _cfg(d, **{"llm.vocab_size": 10}).resolve()
    with pytest.raises(ConfigError, match="--tokenizer-model .*missing"):
        _cfg(d / "missing").resolve()


def test_a_config_with_a_tokenizer_needs_its_vocabulary(tok_dir):
    """No caller can get the flavor's vocabulary for a run that names a tokenizer."""
    d, _ = tok_dir
    with pytest.raises(TypeError, match="configured_vocabulary"):
        _cfg(d).resolved_model()
