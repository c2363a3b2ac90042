"""The NaViL tokenizer: special-token ids, never-split specials, round trips, chat templates.

Proves: a tiny freshly trained model (vocab 500, trained on the fly) puts NaViL's 12 special
tokens at the LAST 12 ids, consecutive in megatron_navil.config.SPECIAL_TOKENS order, agreeing
with NaViLModelConfig's id arithmetic; encode never splits them; decode(encode(x)) == x for
arbitrary text (byte fallback); wrapping an existing sentencepiece model appends the specials
after its vocabulary; both chat template styles produce the text of their reference format
(checked by decoding) and put loss exactly on assistant content + <|im_end|>.
"""

from __future__ import annotations

import io
import os

import pytest
import sentencepiece as spm

from megatron_navil.config import IMG_CONTEXT, SPECIAL_TOKENS, NaViLModelConfig
from megatron_navil.data.chat_template import apply_chat_template, count_sample_tokens
from megatron_navil.data.tokenizer import NaViLTokenizer, TokenizerError

TEXTS = [
    "hello world",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\n\n",
    "数字 123 ünïcödé 🚀",
    "a<img>b</img><IMG_CONTEXT><IMG_CONTEXT>c",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return NaViLTokenizer.load(tiny_tokenizer)


def test_trained_specials_are_the_last_12_consecutive_ids(tok):
    assert tok.vocab_size == 500
    assert tok.first_special_token_id == tok.vocab_size - 12
    for row, name in enumerate(SPECIAL_TOKENS):
        assert tok.special_token_id(name) == tok.first_special_token_id + row
    cfg = NaViLModelConfig()
    cfg.llm.first_special_token_id, cfg.llm.vocab_size = tok.first_special_token_id, tok.vocab_size
    cfg.validate()
    assert cfg.img_context_id == tok.special_token_id(IMG_CONTEXT)
    assert cfg.img_start_id == tok.special_token_id("<img>")


def test_specials_are_never_split(tok):
    for name in SPECIAL_TOKENS:
        assert tok.encode(name) == [tok.special_token_id(name)]
        ids = tok.encode(f"x{name}y {name}")
        assert ids.count(tok.special_token_id(name)) == 2
    # as untrusted text, the same strings are ordinary pieces
    ids = tok.encode("<img>", allow_special=False)
    assert len(ids) > 1 and not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == "<img>"


def test_roundtrip(tok):
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t, repr(t)
    assert max(i for t in TEXTS for i in tok.encode(t)) < tok.vocab_size
    assert tok.encode("🚀") and tok.unk_id not in tok.encode("🚀")  # byte fallback, no <unk>


def test_save_load_and_integrity_check(tok, tmp_path):
    tok.save(str(tmp_path))
    again = NaViLTokenizer.load(str(tmp_path))
    assert again.encode(TEXTS[4]) == tok.encode(TEXTS[4])
    other = io.BytesIO()  # a valid but different model put in its place
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["other text"] * 20),
        model_writer=other,
        vocab_size=10,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(other.getvalue())
    with pytest.raises(TokenizerError, match="sha256"):
        NaViLTokenizer.load(str(tmp_path))


def test_wrapping_an_existing_model_appends_specials(tmp_path):
    # An InternLM2-like model made independently (plain sentencepiece defaults, dummy prefix).
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([f"sentence {i} about cats and dogs" for i in range(200)]),
        model_writer=model,
        vocab_size=40,
        minloglevel=2,
        user_defined_symbols=["<|im_end|>"],
    )
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.getvalue())
    base = spm.SentencePieceProcessor(model_file=str(path))
    tok = NaViLTokenizer.load(str(path))
    assert tok.first_special_token_id == base.get_piece_size() == 40
    assert tok.vocab_size == 52
    assert [tok.special_token_id(n) for n in SPECIAL_TOKENS] == list(range(40, 52))
    assert tok.encode("cats and dogs") == base.encode("cats and dogs")  # base ids unchanged
    assert tok.template_tokens == {"<|im_end|>": base.piece_to_id("<|im_end|>")}
    assert tok.decode(tok.encode("cats<img>dogs")) == "cats<img>dogs"


CONV = [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "<image>\nWhat is it?"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "Sure?"},
    {"from": "gpt", "value": "Yes."},
]


@pytest.mark.parametrize("style", ["internlm2", "qwen3"])
def test_chat_template_text_and_loss_spans(tok, style):
    img = tok.image_token_ids([(1, 2)])
    enc = apply_chat_template(tok, CONV, style=style, image_tokens=[img])
    think = "<think>\n\n</think>\n\n" if style == "qwen3" else ""
    want = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT><IMG_LINE_BREAK><IMG_FRAME_BREAK>"
        "</img>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n"
        f"<|im_start|>assistant\n{think}Yes.<|im_end|>\n"
    )
    body = enc.ids[1:] if style == "internlm2" else enc.ids
    assert (enc.ids[0] == tok.bos_id) == (style == "internlm2")
    assert tok.decode(body) == want
    assert len(enc.loss_mask) == len(enc.ids)
    trained = [tok.decode(enc.ids[s:e]) for s, e in enc.assistant_spans]
    assert trained == ["A cat.<|im_end|>", f"{think}Yes.<|im_end|>"]
    assert sum(enc.loss_mask) == sum(e - s for s, e in enc.assistant_spans)
    ((s, e),) = enc.image_spans
    assert enc.ids[s:e] == img and not any(enc.loss_mask[s:e])
    # without image tokens the image takes no ids, and the index counts exactly that length
    bare = apply_chat_template(tok, CONV, style=style)
    assert len(bare.ids) == len(enc.ids) - len(img)
    assert count_sample_tokens(tok, {"conversations": CONV}, style) == len(bare.ids)


def test_image_token_layout(tok):
    t = tok.special_tokens
    ids = tok.image_token_ids([(1, 1), (2, 3)])
    want = [t["<img>"], t["<IMG_CONTEXT>"], t["<IMG_LINE_BREAK>"], t["<IMG_FRAME_BREAK>"]]
    want += ([t["<IMG_CONTEXT>"]] * 3 + [t["<IMG_LINE_BREAK>"]]) * 2
    want += [t["<IMG_FRAME_BREAK>"], t["</img>"]]
    assert ids == want


def test_bad_tokenizer_files_give_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="cannot read"):
        NaViLTokenizer.load(str(tmp_path / "nope.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        NaViLTokenizer.load(str(tmp_path / "junk.model"))
    os.makedirs(tmp_path / "d")
    with pytest.raises(TokenizerError, match="navil_tokenizer.json"):
        NaViLTokenizer.load(str(tmp_path / "d"))
