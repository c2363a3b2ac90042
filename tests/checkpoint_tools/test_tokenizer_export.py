"""The tokenizer files of an HF export load in transformers 4.51.3 (the release's version) as the
released NaViL demo loads them, `AutoTokenizer.from_pretrained(dir, use_fast=False)`, and give our
ids. Tolerance: exact ids / exact strings everywhere, except the fast Unigram tokenizer's
documented ties (same text, same total score to 1e-6 relative).

Proves, for OUR sentencepiece tokenizers (made by navil-tokenizer's own code path: `train` (BPE,
and Unigram) on a small corpus with newlines, punctuation, digits, unicode and code; `wrap` of an
InternLM2-like model with a dummy prefix and byte fallback), exported by `write_tokenizer_files`
(no remote code, HF_HUB_OFFLINE=1, nothing downloaded):
- use_fast=False gives transformers' slow GemmaTokenizer; `encode(s, add_special_tokens=False)`
  equals NaViLTokenizer.encode(s) for a corpus of tricky strings (leading/trailing/multiple
  spaces, newlines, tabs, unicode, emoji, digits, a literal '▁', the 12 special tokens alone,
  repeated and inside text, `<img><IMG_CONTEXT></img>`, chat markers) and 2000 random strings, and
  equals sentencepiece's own EncodeAsIds for text without special tokens; with special tokens
  added it prepends BOS exactly for the internlm2 style; convert_tokens_to_ids(special k) ==
  first_special_token_id + k; bos/eos/pad/unk ids and the vocabulary size are ours; decode gives
  our decode (and the text back for the lossless trained tokenizer); the documented difference:
  the control pieces' strings (`<s>` ...) written in text are those tokens in transformers;
- the default use_fast=True loads the tokenizer.json we write (GemmaTokenizerFast, not
  transformers' converter, which swaps BOS/EOS for our id layout): the same ids for BPE models,
  decode as ours (dummy-prefix models: with skip_special_tokens); for Unigram models every
  difference is an exact score tie; a model with NFKC normalisation gets no tokenizer.json;
- the Jinja chat template renders, for both styles, with and without a generation prompt, with
  role/content and LLaVA from/value turns and `empty_think=False`, the string our chat template
  encodes, and tokenizes to our ids; an image expanded to its token string gives our image ids;
  the ids are those of the whole rendered string also where encoding the header and the content
  apart would differ: a content starting with what forms one piece with the header's "\\n"
  ("\\n." + ...), and every turn of a dummy-prefix (InternLM2-like) model; the loss mask equals
  an oracle from the fast tokenizer's character offsets (ids overlapping an assistant content or
  its <|im_end|>);
- through export_hf: the model's template and sequence length reach tokenizer_config.json, and
  HF -> Megatron -> HF reproduces the tokenizer files byte for byte;
- Qwen3 family (transformers' own Qwen2Tokenizer, a byte-level BPE vocab.json/merges.txt and
  tokenizer.json made on the fly): after llm-to-navil's and navil-to-hf's copies, slow and fast
  tokenizers encode text as the source did, and the 12 tokens are single ids at first + k;
- InternLM2 family (tokenizer_config.json naming remote code): the family's files are kept (its
  tokenizer code copied only when the source has it), the 12 tokens registered, the directory
  loads as a NaViLTokenizer; transformers refuses it without trust_remote_code.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from megatron_navil.config import SPECIAL_TOKENS  # noqa: E402
from megatron_navil.conversion.tokenizer_files import write_tokenizer_files  # noqa: E402
from megatron_navil.data.chat_template import apply_chat_template  # noqa: E402
from megatron_navil.data.tokenizer import NaViLTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

WORDS = (
    "the a cat dog sat on mat photo of image red blue green small large rocket camera "
    "café naïve ünïcödé 日本語 数字 🚀 12 345 6789 def return x + 1 ( ) [ ] { } :: -> = , . ; ! ? "
    '\'s "q"'
).split(" ")
SEPARATORS = ["", " ", " ", " ", "  ", "\n", "\n\n", "\t", ".", ",", ":", "\n."]
CORPUS = [
    "hello world",
    " leading",
    "  two leading",
    "trailing ",
    "trailing two  ",
    "a  b   c",
    "tabs\tand\nnewlines\n\n",
    "\n\nstarts with newlines",
    "\n.",
    "\r\n windows",
    "数字 123 ünïcödé 🚀",
    "1234567890",
    "3.14159, -2e10",
    "def f(x):\n    return x + 1\n",
    "▁literal ▁ underscore-ish",
    "emoji 🚀🚀 and 👩‍👩‍👧",
    "",
    " ",
    "\n",
    "  \n  ",
    "a<img>b</img><IMG_CONTEXT><IMG_CONTEXT>c",
    "<img><IMG_CONTEXT></img>",
    " <img> x </img> ",
    "<img>\n<IMG_CONTEXT>\n</img>\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "x<|im_end|>.",
    "<think>\n\n</think>\n\nok",
    "<ref>a cat</ref><box>[[1, 2, 3, 4]]</box>",
    "<quad>x</quad>",
    "<img_uncond><img>",
    "<IMG_LINE_BREAK><IMG_FRAME_BREAK>",
    "<img",
    "img>",
    "<<img>>",
    "</img></img>",
]
CONTROL_STRINGS = ["<s>", "</s>", "<unk>", "<pad>"]
CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi! a cat."}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is\nthis?"},
        {"role": "assistant", "content": "a dog"},
        {"role": "user", "content": "ok  then"},
    ],
    [
        {"from": "human", "value": "describe 数字 🚀"},
        {"from": "gpt", "value": "x = 1 + 2"},
        {"from": "human", "value": "more"},
        {"from": "gpt", "value": "done."},
    ],
    [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": "again"},
    ],
]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        "".join(rng.choice(SEPARATORS) + rng.choice(WORDS) for _ in range(rng.randint(3, 16)))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tokenizer made by `navil-tokenizer train` (vocab 512, byte fallback, no dummy prefix)."""
    from data_tools.tokenizer_cli import main

    d = tmp_path_factory.mktemp("trained")
    with open(d / "corpus.jsonl", "w", encoding="utf-8") as f:
        for t in _texts(800, 0) + ["user\nhello\n", "Q: what?\nA: yes.\n\n"] * 20:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    assert (
        main(
            [
                "train",
                "--input",
                str(d / "corpus.jsonl"),
                "--vocab-size",
                "512",
                "--output",
                str(d / "tok"),
            ]
        )
        == 0
    )
    return d / "tok"


def _internlm2_like_model() -> bytes:
    """A sentencepiece model made like InternLM2's: BPE, dummy prefix, byte fallback, identity
    normalisation, chat markers as user-defined symbols, no pad piece."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_texts(600, 1)),
        model_writer=buf,
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        hard_vocab_limit=False,
        pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        minloglevel=2,
        num_threads=1,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def unigram(tmp_path_factory, trained) -> Path:
    """`navil-tokenizer train --model-type unigram` on the same corpus."""
    from data_tools.tokenizer_cli import main

    d = tmp_path_factory.mktemp("unigram")
    assert (
        main(
            [
                "train",
                "--input",
                str(trained.parent / "corpus.jsonl"),
                "--vocab-size",
                "512",
                "--model-type",
                "unigram",
                "--output",
                str(d / "tok"),
            ]
        )
        == 0
    )
    return d / "tok"


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory) -> Path:
    """A tokenizer made by `navil-tokenizer wrap` of an InternLM2-like tokenizer.model."""
    from data_tools.tokenizer_cli import main

    d = tmp_path_factory.mktemp("wrapped")
    (d / "tokenizer.model").write_bytes(_internlm2_like_model())
    assert main(["wrap", "--model", str(d / "tokenizer.model"), "--output", str(d / "tok")]) == 0
    return d / "tok"


def _export(src: Path, out: Path, style: str = "internlm2-chat", max_len: int = 2048):
    tok = NaViLTokenizer.load(str(src))
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(
        src, out, tok.first_special_token_id, chat_template=style, model_max_length=max_len
    )
    return tok, AutoTokenizer.from_pretrained(str(out), use_fast=False)


def _strings(tok: NaViLTokenizer) -> list[str]:
    out = list(CORPUS)
    for t in list(SPECIAL_TOKENS) + list(tok.template_tokens):
        out += [t, f"x{t}y", f" {t} ", f"{t}{t}", f"\n{t}\n", f"a {t}b", f"{t} a cat"]
    return out


def _random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghij xyz  \n\t.,:;!?-_()[]{}<>/|0123456789") + [
        "é",
        "ü",
        "日",
        "本",
        "🚀",
        "▁",
        "\r",
        "  ",
        "\n\n",
        "    ",
        "<img>",
        "</ref>",
        "<IMG_CONTEXT>",
        "<|im_start|>",
        "<|im_end|>",
        "<think>",
        "<0x41>",
        "<im",
        "im_end|>",
    ]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.mark.parametrize("which", ["trained", "unigram", "wrapped"])
def test_text_and_special_tokens_give_our_ids(which, request, tmp_path):
    src = request.getfixturevalue(which)
    tok, hf = _export(src, tmp_path / "hf")
    assert type(hf).__name__ == "GemmaTokenizer"
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
        tok.unk_id,
    )
    assert len(hf) == tok.vocab_size and hf.model_max_length == 2048
    for row, t in enumerate(SPECIAL_TOKENS):
        assert hf.convert_tokens_to_ids(t) == tok.first_special_token_id + row
        assert hf.convert_ids_to_tokens(tok.first_special_token_id + row) == t
    for t, i in tok.template_tokens.items():
        assert hf.convert_tokens_to_ids(t) == i
    for s in _strings(tok) + _random_strings(2000, 0):
        ids = tok.encode(s)
        assert hf.encode(s, add_special_tokens=False) == ids, repr(s)
        assert hf(s)["input_ids"] == [tok.bos_id] + ids, repr(s)  # internlm2 style: BOS first
        assert hf.decode(ids) == tok.decode(ids), repr(s)
        if which != "wrapped" and "▁" not in s:  # identity + byte fallback: lossless, except
            # that sentencepiece reads a literal '▁' as a space (NaViLTokenizer too)
            assert hf.decode(ids) == s, repr(s)
        if not any(t in s for t in list(SPECIAL_TOKENS) + list(tok.template_tokens)):
            assert hf.encode(s, add_special_tokens=False) == tok.sp.EncodeAsIds(s), repr(s)
    # Documented difference: the control pieces' strings are those tokens in transformers.
    for s in CONTROL_STRINGS:
        if tok.sp.piece_to_id(s) != tok.unk_id or s == "<unk>":
            assert hf.encode(s, add_special_tokens=False) == [hf.convert_tokens_to_ids(s)]
            assert tok.encode(s) != hf.encode(s, add_special_tokens=False)


@pytest.mark.parametrize("which", ["trained", "unigram", "wrapped"])
def test_fast_tokenizer_gives_our_ids(which, request, tmp_path):
    src = request.getfixturevalue(which)
    tok, slow = _export(src, tmp_path / "hf")
    fast = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))  # use_fast=True, the default
    assert type(fast).__name__ == "GemmaTokenizerFast"
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id, fast.unk_token_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
        tok.unk_id,
    )
    assert len(fast) == tok.vocab_size
    for row, t in enumerate(SPECIAL_TOKENS):
        assert fast.convert_tokens_to_ids(t) == tok.first_special_token_id + row
    ties = 0
    for s in _strings(tok) + _random_strings(2000, 1):
        ids, got = tok.encode(s), fast.encode(s, add_special_tokens=False)
        if which == "unigram" and got != ids and "<0x" not in s:  # documented: exact ties only

            def score(seq):
                return sum(tok.sp.get_score(i) for i in seq if i < tok.base_vocab_size)

            assert tok.decode(got) == tok.decode(ids) and score(got) == pytest.approx(score(ids))
            ties += 1
            continue
        if which != "unigram" or "<0x" not in s:
            assert got == ids, repr(s)
            assert fast(s)["input_ids"] == [tok.bos_id] + ids, repr(s)
        if which == "wrapped":  # the prefix space is stripped once, not after each special token
            assert fast.decode(ids, skip_special_tokens=True) == slow.decode(
                ids, skip_special_tokens=True
            ), repr(s)
        else:
            assert fast.decode(ids) == tok.decode(ids), repr(s)
    assert ties < 20
    for conv in CONVERSATIONS:  # both loaders render and encode the template alike
        assert fast.apply_chat_template(conv) == slow.apply_chat_template(conv)


def test_models_tokenizers_cannot_express_get_no_fast_file(tmp_path):
    from tests.checkpoint_tools.plain_llm import sentencepiece_model

    (tmp_path / "src").mkdir()  # sentencepiece defaults: NFKC normalisation, extra spaces removed
    (tmp_path / "src/tokenizer.model").write_bytes(sentencepiece_model(224))
    (tmp_path / "out").mkdir()
    written = write_tokenizer_files(tmp_path / "src", tmp_path / "out", 224)
    assert "tokenizer.json" not in written and "navil_tokenizer.json" in written
    tok = NaViLTokenizer.load(str(tmp_path / "out"))
    slow = AutoTokenizer.from_pretrained(str(tmp_path / "out"), use_fast=False)
    for s in ["hello world", "a<img>b  c", " <IMG_CONTEXT> x"]:
        assert slow.encode(s, add_special_tokens=False) == tok.encode(s)


def test_qwen3_style_adds_no_bos(trained, tmp_path):
    tok, hf = _export(trained, tmp_path / "hf", style="qwen3")
    assert hf("a<img>b")["input_ids"] == tok.encode("a<img>b")
    # A released template we do not render (e.g. Hermes-2): no Jinja template, no BOS.
    tok, hf = _export(trained, tmp_path / "hermes", style="Hermes-2")
    assert hf.chat_template is None and hf("a")["input_ids"] == tok.encode("a")


def _our_string(tok: NaViLTokenizer, hf, ids: list[int]) -> str:
    """The text our ids stand for (the BOS id written as its string, as transformers does)."""
    if ids and ids[0] == tok.bos_id:
        return hf.bos_token + tok.decode(ids[1:])
    return tok.decode(ids)


@pytest.mark.parametrize("style", ["internlm2", "qwen3"])
def test_chat_template_renders_and_encodes_like_ours(trained, tmp_path, style):
    tok, hf = _export(trained, tmp_path / "hf", style=style)
    for conv in CONVERSATIONS:
        for gen in (False, True):
            for kwargs in ({}, {"empty_think": False}):
                ours = apply_chat_template(
                    tok, conv, style=style, add_generation_prompt=gen, **kwargs
                )
                text = hf.apply_chat_template(
                    conv, tokenize=False, add_generation_prompt=gen, **kwargs
                )
                assert text == _our_string(tok, hf, ours.ids), (conv, gen, kwargs)
                assert hf.apply_chat_template(conv, add_generation_prompt=gen, **kwargs) == ours.ids
    if style == "qwen3":
        assert "<think>\n\n</think>\n\n" in hf.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    with pytest.raises(Exception, match="need role"):
        hf.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_image_tokens_in_chat(trained, tmp_path):
    tok, hf = _export(trained, tmp_path / "hf")
    image = tok.image_token_ids([(1, 2), (2, 3)])
    conv = [
        {"role": "user", "content": "<image>\nwhat is it?"},
        {"role": "assistant", "content": "a cat"},
    ]
    ours = apply_chat_template(tok, conv, image_tokens=[image])
    expanded = [
        dict(conv[0], content=conv[0]["content"].replace("<image>", tok.decode(image))),
        conv[1],
    ]
    assert hf.apply_chat_template(expanded) == ours.ids
    s, e = ours.image_spans[0]
    assert ours.ids[s:e] == image


def _require(cond: bool, what: str) -> None:
    """A precondition of a known-limit test: failing it is an error, not the expected failure."""
    if not cond:
        raise RuntimeError(what)


def test_chat_content_merging_with_the_header(trained, tmp_path):
    """A content whose first character forms one piece with the header's newline ("\\n.") gets
    the whole-string ids, and that spanning piece is trained (it predicts content)."""
    tok, hf = _export(trained, tmp_path / "hf")
    _require(
        "\n." in [tok.sp.id_to_piece(i) for i in range(tok.base_vocab_size)], "no '\\n.' piece"
    )
    conv = [
        {"role": "user", "content": ".starts with a dot"},
        {"role": "assistant", "content": ".ok"},
    ]
    ours = apply_chat_template(tok, conv)
    assert hf.apply_chat_template(conv, tokenize=False) == _our_string(tok, hf, ours.ids)
    assert hf.apply_chat_template(conv) == ours.ids
    newline_dot = tok.sp.piece_to_id("\n.")
    ((s, e),) = ours.assistant_spans
    assert ours.ids[s] == newline_dot and ours.loss_mask[s] == 1 and ours.loss_mask[s - 1] == 0
    assert ours.ids.count(newline_dot) == 2  # the user's one is not trained
    assert ours.loss_mask[ours.ids.index(newline_dot)] == 0


def test_chat_with_a_dummy_prefix_model(wrapped, tmp_path):
    """InternLM2-like model (dummy prefix): the content after the role header gets no '▁' of its
    own, as in whole-string tokenization, for every conversation and both styles."""
    tok, hf = _export(wrapped, tmp_path / "hf")
    _require(
        tok.sp.encode("hello") != tok.sp.encode("x\nhello")[-len(tok.sp.encode("hello")) :],
        "the model adds no dummy prefix",
    )
    for style in ("internlm2", "qwen3"):
        tok, hf = _export(wrapped, tmp_path / style, style=style)
        for conv in CONVERSATIONS:
            for gen in (False, True):
                ours = apply_chat_template(tok, conv, style=style, add_generation_prompt=gen)
                assert hf.apply_chat_template(conv, add_generation_prompt=gen) == ours.ids, conv


def _loss_oracle(fast, text: str, trained_ranges: list[tuple[int, int]]) -> list[int]:
    """1 for each id of `text` (tokenized by the HF fast tokenizer, offsets from the `tokenizers`
    library, not from sentencepiece) whose characters overlap a trained range."""
    enc = fast(text, add_special_tokens=False, return_offsets_mapping=True)
    return [
        int(any(a < max(e, b + 1) and b < z for a, z in trained_ranges))
        for b, e in enc["offset_mapping"]
    ]


def _assistant_ranges(text: str, conv, think: str) -> list[tuple[int, int]]:
    """Character ranges of each assistant content (+ <|im_end|>) in the rendered `text`,
    found by walking the turns in order."""
    out, pos = [], 0
    for t in conv:
        role = {"human": "user", "gpt": "assistant"}.get(t.get("from"), t.get("role"))
        body = t.get("content", t.get("value"))
        header = f"<|im_start|>{role}\n"
        pos = text.index(header, pos) + len(header)
        if role == "assistant" and text.startswith(think, pos):
            body = think + body
        assert text.startswith(body + "<|im_end|>", pos)
        if role == "assistant":
            out.append((pos, pos + len(body) + len("<|im_end|>")))
        pos += len(body)
    return out


@pytest.mark.parametrize("style", ["internlm2", "qwen3"])
def test_chat_loss_mask_matches_an_offsets_oracle(trained, tmp_path, style):
    """Loss goes on exactly the ids that overlap an assistant content or its <|im_end|>, by the
    fast tokenizer's offsets (ids equal to ours: checked here too); assistant_spans cover them."""
    tok, _ = _export(trained, tmp_path / "hf", style=style)
    fast = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), use_fast=True)
    think = "<think>\n\n</think>\n\n" if style == "qwen3" else ""
    convs = CONVERSATIONS + [
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": ".\n. 🚀 数字\n\n"}]
    ]
    for conv in convs:
        ours = apply_chat_template(tok, conv, style=style)
        text = fast.apply_chat_template(conv, tokenize=False)
        body = text[len(fast.bos_token) :] if style == "internlm2" else text
        oracle = _loss_oracle(fast, body, _assistant_ranges(body, conv, think))
        ids = ours.ids[1:] if style == "internlm2" else ours.ids
        mask = ours.loss_mask[1:] if style == "internlm2" else ours.loss_mask
        assert fast(body, add_special_tokens=False)["input_ids"] == ids, conv
        assert mask == oracle, conv
        spans = [i for s, e in ours.assistant_spans for i in range(s, e)]
        assert spans == [i for i, m in enumerate(ours.loss_mask) if m], conv


def test_export_hf_writes_the_models_template_and_round_trips(trained, tmp_path, cli):
    import torch

    from megatron_navil.config import get_flavor
    from megatron_navil.conversion import export_hf, hf_to_megatron
    from megatron_navil.conversion.plan import padded_vocab
    from megatron_navil.reference import NaViLReference
    from tests.checkpoint_tools.conftest import same_files

    tok = NaViLTokenizer.load(str(trained))
    cfg = get_flavor("debug-internlm2").apply_overrides(
        {"llm.first_special_token_id": tok.first_special_token_id}
    )
    ref = NaViLReference(cfg).init_weights_(torch.Generator().manual_seed(0))
    export_hf(
        hf_to_megatron(ref.state_dict(), cfg, padded_vocab(cfg)),
        tmp_path / "hf",
        cfg,
        tokenizer_dir=trained,
    )
    config = json.loads((tmp_path / "hf/tokenizer_config.json").read_text())
    assert config["model_max_length"] == cfg.llm.max_sequence_length and config["add_bos_token"]
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), use_fast=False)
    for conv in CONVERSATIONS:
        assert hf.apply_chat_template(conv) == apply_chat_template(tok, conv, style="internlm2").ids
    rc = cli(
        ["hf-to-navil", "--hf", tmp_path / "hf", "--output", tmp_path / "ck", "--no-progress"]
    )[0]
    assert rc == 0
    export_hf(tmp_path / "ck", tmp_path / "hf2")
    names = [n for n in os.listdir(tmp_path / "hf") if "token" in n]
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= set(names)
    assert [n for n in same_files(tmp_path / "hf", tmp_path / "hf2") if n in names] == []


# ----------------------------------------------------------------------------- Qwen3 family


def _qwen3_tokenizer_dir(d: Path) -> int:
    """vocab.json/merges.txt (byte-level BPE trained on the fly), tokenizer.json and a Qwen3-style
    tokenizer_config.json (Qwen2Tokenizer, 5 added tokens); returns the BPE vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d.mkdir(parents=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        _texts(400, 2),
        trainers.BpeTrainer(
            vocab_size=320,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    bpe.model.save(str(d))
    v = bpe.get_vocab_size()
    added = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(v + k): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": "think" not in t,
            }
            for k, t in enumerate(added)
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    fast = AutoTokenizer.from_pretrained(str(d))  # transformers' own conversion -> tokenizer.json
    fast.save_pretrained(str(d.parent / "fast"))
    shutil.copyfile(d.parent / "fast/tokenizer.json", d / "tokenizer.json")
    return v


def test_qwen3_family_keeps_its_tokenizer(tmp_path):
    from megatron_navil.conversion.hf_llm import tokenizer_vocab_end

    v = _qwen3_tokenizer_dir(tmp_path / "llm")
    first = tokenizer_vocab_end(tmp_path / "llm")
    assert first == v + 5  # what llm-to-navil picks: after the BPE vocabulary and added tokens
    (tmp_path / "ck").mkdir()
    (tmp_path / "hf").mkdir()
    write_tokenizer_files(tmp_path / "llm", tmp_path / "ck", first)  # llm-to-navil
    write_tokenizer_files(tmp_path / "ck", tmp_path / "hf", first)  # navil-to-hf
    base = AutoTokenizer.from_pretrained(str(tmp_path / "llm"), use_fast=False)
    slow = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), use_fast=False)
    fast = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (type(slow).__name__, type(fast).__name__) == ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    assert len(slow) == first + len(SPECIAL_TOKENS)
    for row, t in enumerate(SPECIAL_TOKENS):
        assert slow.convert_tokens_to_ids(t) == fast.convert_tokens_to_ids(t) == first + row
    for s in CORPUS:
        ids = slow.encode(s)
        assert fast.encode(s) == ids and slow.decode(ids) == s, repr(s)
        if not any(t in s for t in SPECIAL_TOKENS):
            assert ids == base.encode(s), repr(s)
        else:  # every special token is one id; the text between encodes as before
            parts = [p for p in _split(s) if p]
            want = [
                first + SPECIAL_TOKENS.index(p) if p in SPECIAL_TOKENS else base.encode(p)
                for p in parts
            ]
            assert ids == [i for w in want for i in (w if isinstance(w, list) else [w])], repr(s)
    assert slow.eos_token == "<|im_end|>" and slow.bos_token is None
    names = (
        "added_tokens.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
    )
    for n in names:  # a second copy (hf-to-navil, navil-to-hf again) changes nothing
        assert (tmp_path / "ck" / n).read_bytes() == (tmp_path / "hf" / n).read_bytes(), n


def _split(s: str) -> list[str]:
    """`s` split around the special tokens (kept), longest token first."""
    import re

    alts = sorted(SPECIAL_TOKENS, key=len, reverse=True)
    return re.split("(" + "|".join(re.escape(t) for t in alts) + ")", s)


# ----------------------------------------------------------------------------- InternLM2 family


def test_internlm2_family_keeps_its_remote_code_files(tmp_path):
    src = tmp_path / "llm"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(_internlm2_like_model())
    pieces = NaViLTokenizer((src / "tokenizer.model").read_bytes()).base_vocab_size
    amap = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
    (src / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "InternLM2Tokenizer",
                "auto_map": amap,
                "add_bos_token": True,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    code = "# stands for InternLM2's tokenizer code, which we never ship\n"
    (src / "tokenization_internlm2.py").write_text(code)
    out = tmp_path / "out"
    out.mkdir()
    written = write_tokenizer_files(src, out, pieces)
    assert {"tokenization_internlm2.py", "navil_tokenizer.json", "tokenizer.model"} <= set(written)
    assert (out / "tokenization_internlm2.py").read_text() == code
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "InternLM2Tokenizer" and config["auto_map"] == amap
    assert config["add_bos_token"] is True and "chat_template" not in config
    for row, t in enumerate(SPECIAL_TOKENS):
        assert config["added_tokens_decoder"][str(pieces + row)]["content"] == t
    tok = NaViLTokenizer.load(str(out))
    assert pieces + SPECIAL_TOKENS.index("<img>") in tok.encode("a<img>b")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoTokenizer.from_pretrained(str(out), use_fast=False, trust_remote_code=False)
