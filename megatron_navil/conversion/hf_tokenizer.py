"""Hugging Face tokenizer files for OUR sentencepiece tokenizers (navil-tokenizer output).

A NaViLTokenizer directory (`tokenizer.model` + `navil_tokenizer.json`) gets a
`tokenizer_config.json` that transformers (4.51, the release's version) loads WITHOUT remote code:
`AutoTokenizer.from_pretrained(dir, use_fast=False)` (what the released NaViL demo calls) gives
a `GemmaTokenizer`, the slow sentencepiece class whose behaviour is NaViLTokenizer's:
- encode: split the text on the added tokens (the 12 NaViL special tokens at
  `first_special_token_id + row`, the chat markers `<|im_start|>` ... that the model has as pieces,
  and the control pieces bos/eos/unk/pad), then `SentencePieceProcessor.encode` of every piece in
  between, with the model as stored (no extra '▁', no dummy-prefix change, no normalisation);
  NaViLTokenizer does the same, so the ids are identical;
- decode: sentencepiece decode of the runs between added tokens, added tokens verbatim (also
  NaViLTokenizer's rule), no spaces inserted.
`LlamaTokenizer` was not chosen: whatever `legacy` / `add_prefix_space`, its decode puts spaces
around the special tokens (`a<img>b` -> `a <img> b`: transformers' base `_decode` joins with
spaces by default); with `legacy=False` it also drops the space before a special token
(` <img>` encodes as `<img>`) and removes the dummy prefix of models that have one (InternLM2's:
every text differs). (Measured with transformers 4.51.3 on the test tokenizers.)

Known, documented differences from NaViLTokenizer (they are transformers' rules for every
tokenizer): the control pieces' strings (`<s>`, `</s>`, `<unk>`, `<pad>`) written in text are
matched as those tokens (NaViLTokenizer encodes them as text); decode writes control ids as their
strings and `<unk>` as "<unk>" (sentencepiece: "" and " ⁇ ").

`use_fast=True` (AutoTokenizer's default, what vLLM & co. load) would otherwise convert the slow
tokenizer with transformers' GemmaConverter, which assumes Gemma's id layout (pad 0, eos 1, bos 2,
unk 3): with ours (unk 0, bos 1, eos 2) it swaps BOS and EOS. So we also write `tokenizer.json`
(`tokenizer_json`), a `tokenizers` BPE / Unigram model built from the sentencepiece model itself
(merges ranked by the merged piece's score, byte fallback, `▁` for spaces, the dummy prefix as a
per-segment `Prepend`), for models whose normalisation it can express exactly: identity
normalisation, whitespace kept (what navil-tokenizer trains; InternLM2's model). For BPE models
(navil-tokenizer's default, InternLM2's) its encode equals NaViLTokenizer's (tested on thousands of
random strings); for Unigram models it may break exact score ties differently (runs of spaces:
`▁▁|▁` vs `▁|▁▁`) and matches a byte piece's literal name (`<0x41>`) in text. Its decode equals
NaViLTokenizer's except after special tokens in dummy-prefix models (the `tokenizers` decoder
strips the prefix space once, sentencepiece once per run). Other models get no tokenizer.json:
use `use_fast=False` with them (transformers' converter gets their BOS/EOS wrong).

`add_bos_token` follows the chat style: internlm2 samples start with BOS in our data pipeline
(the release's InternLM2 tokenizer adds it to every call, and its chat code relies on that),
qwen3 samples do not. The chat template (Jinja, `chat_template`) renders the string
megatron_navil.data.chat_template builds for a conversation (see `chat_template_jinja`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from megatron_navil.backbones import FAMILIES, by_template
from megatron_navil.config.model import SPECIAL_TOKENS

TOKENIZER_CLASS = "GemmaTokenizer"
"""The transformers class named in our tokenizer_config.json (slow, sentencepiece, no remote
code)."""
STYLES = {
    name: family.chat_style
    for family in FAMILIES.values()
    for name in (family.chat_style, family.template)
}
"""Chat styles (megatron_navil.data.chat_template) by style or NaViL template name."""
SPECIAL_TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>")
"""Template markers registered as special (skip_special_tokens drops them, as Qwen's and
InternLM2's tokenizers do); `<think>` / `</think>` are added tokens but not special (Qwen3)."""


def _adds_bos(style: str) -> bool:
    """Whether the tokenizer of the family with this chat style prepends BOS."""
    family = by_template(style)
    if family is None:
        raise ValueError(f"unknown chat style {style!r}")
    return family.add_bos


def chat_style(name: Optional[str]) -> Optional[str]:
    """The chat style of a style or template name (None when it is not one of ours)."""
    return STYLES.get(name) if name else None


def chat_template_jinja(style: str) -> str:
    """The Jinja chat template of `style`, rendering the string that
    megatron_navil.data.chat_template.apply_chat_template encodes:

    internlm2: `{bos}<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn;
    qwen3:     `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, and a final assistant turn
               after the last user turn starts with `<think>\\n\\n</think>\\n\\n` (pass
               `empty_think=False` to apply_chat_template to leave it out, as ours does);
    `add_generation_prompt` appends `<|im_start|>assistant\\n`. Roles: system|user|assistant, or
    LLaVA's human|gpt (with `from`/`value` keys); anything else raises. `<image>` placeholders
    stay in the text (the caller expands them, as the released chat code does).
    """
    if style not in ("internlm2", "qwen3"):
        raise ValueError(f"unknown chat style {style!r}")
    role_of = "(m['role'] if m['role'] is defined else m['from']) | string | lower"
    parts = [
        "{%- set roles = {'system': 'system', 'user': 'user', 'human': 'user', "
        "'assistant': 'assistant', 'gpt': 'assistant'} -%}",
        "{%- set ns = namespace(last_user=-1) -%}",
        "{%- for m in messages -%}",
        "{%- set r = " + role_of + " -%}",
        "{%- if r not in roles -%}{{- raise_exception('turn ' ~ loop.index0 ~ ': need role "
        "system|user|assistant or human|gpt') -}}{%- endif -%}",
        "{%- if roles[r] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}",
        "{%- endfor -%}",
    ]
    if style == "internlm2":
        parts.append("{{- bos_token -}}")
    parts += [
        "{%- for m in messages -%}",
        "{%- set role = roles[" + role_of + "] -%}",
        "{%- set content = m['content'] if m['content'] is defined else m['value'] -%}",
        "{%- if content is not string -%}{{- raise_exception('turn ' ~ loop.index0 ~ ': "
        "content must be a string') -}}{%- endif -%}",
        "{{- '<|im_start|>' + role + '\\n' -}}",
    ]
    if style == "qwen3":
        parts.append(
            "{%- if role == 'assistant' and loop.last and loop.index0 > ns.last_user "
            "and (empty_think is not defined or empty_think) -%}"
            "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
        )
    parts += [
        "{{- content + '<|im_end|>\\n' -}}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
    ]
    return "".join(parts)


def _added(content: str, special: bool = True) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _control(tok) -> dict[str, int]:
    return {
        "unk_token": tok.unk_id,
        "bos_token": tok.bos_id,
        "eos_token": tok.eos_id,
        "pad_token": tok.pad_id,
    }


def _added_tokens(tok) -> dict[str, tuple[int, bool]]:
    """token -> (id, special) of what transformers matches before sentencepiece: the control
    pieces bos/eos/unk/pad, the chat markers the model has, the 12 NaViL special tokens."""
    out = {tok.sp.id_to_piece(i): (i, True) for i in set(_control(tok).values()) if i >= 0}
    out.update({t: (i, t in SPECIAL_TEMPLATE_TOKENS) for t, i in tok.template_tokens.items()})
    out.update({t: (i, True) for t, i in tok.special_tokens.items()})
    return out


def sentencepiece_hf_files(
    directory: Path,
    style: Optional[str] = None,
    model_max_length: Optional[int] = None,
    previous: Optional[dict] = None,
) -> dict[str, dict]:
    """File name -> content of the HF files for the NaViLTokenizer in `directory`:
    tokenizer_config.json, special_tokens_map.json and, when `tokenizer_json` can express the
    model, tokenizer.json.

    `style`: chat style (None: keep `previous`'s chat_template and add_bos_token, if any);
    `model_max_length`: None keeps `previous`'s (else transformers' "no limit")."""
    from megatron_navil.data.tokenizer import NaViLTokenizer

    tok = NaViLTokenizer.load(str(directory))
    previous = previous or {}
    names = {k: (tok.sp.id_to_piece(i) if i >= 0 else None) for k, i in _control(tok).items()}
    decoder = {i: _added(t, special) for t, (i, special) in _added_tokens(tok).items()}
    extra = [t for t in tok.template_tokens if t in SPECIAL_TEMPLATE_TOKENS] + list(SPECIAL_TOKENS)
    if style is not None:
        add_bos, template = _adds_bos(style), chat_template_jinja(style)
    else:
        add_bos, template = (
            bool(previous.get("add_bos_token", False)),
            previous.get("chat_template"),
        )
    max_len = model_max_length if model_max_length is not None else previous.get("model_max_length")
    config = {
        "tokenizer_class": TOKENIZER_CLASS,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        **names,
        "additional_special_tokens": extra,
        "added_tokens_decoder": {str(i): decoder[i] for i in sorted(decoder)},
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "split_special_tokens": False,
        "sp_model_kwargs": {},
    }
    if max_len is not None:
        config["model_max_length"] = int(max_len)
    if template is not None:
        config["chat_template"] = template
    smap = {k: v for k, v in names.items() if v is not None}
    smap["additional_special_tokens"] = extra
    files = {"tokenizer_config.json": config, "special_tokens_map.json": smap}
    fast = tokenizer_json(tok)
    if fast is not None:
        files["tokenizer.json"] = fast
    return files


def is_ours(config: Optional[dict]) -> bool:
    """A source tokenizer_config.json that leaves the HF files of a NaViLTokenizer directory to
    us: none, or one we wrote (our class, no remote code)."""
    if config is None:
        return True
    return "auto_map" not in config and config.get("tokenizer_class") in (None, TOKENIZER_CLASS)


def tokenizer_json(tok) -> Optional[dict[str, Any]]:
    """The `tokenizers` tokenizer.json of NaViLTokenizer `tok` (added tokens as in
    `sentencepiece_hf_files`), or None when its normalisation cannot be expressed exactly."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # protobuf missing: no fast tokenizer file, use_fast=False still works
        return None
    m = pb.ModelProto()
    m.ParseFromString(tok.sp.serialized_model_proto())
    ns, ts = m.normalizer_spec, m.trainer_spec
    normal = {
        p.piece: i for i, p in enumerate(m.pieces) if p.type == pb.ModelProto.SentencePiece.NORMAL
    }
    user = {p.piece for p in m.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED}
    if (
        ns.precompiled_charsmap
        or m.denormalizer_spec.precompiled_charsmap
        or ns.remove_extra_whitespaces
        or not ns.escape_whitespaces
        or ts.treat_whitespace_as_suffix
        or ts.model_type not in (ts.UNIGRAM, ts.BPE)
        or (ns.add_dummy_prefix and user - set(tok.template_tokens))
    ):
        # NOTE: other user-defined pieces must be split off first in `tokenizers`, which adds a
        # dummy prefix after them; sentencepiece (and NaViLTokenizer) do not.
        return None
    added = _added_tokens(tok)
    added.update(
        {
            m.pieces[i].piece: (i, False)
            for i in range(len(m.pieces))
            if m.pieces[i].piece in user and m.pieces[i].piece not in added
        }
    )
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    if ts.model_type == ts.BPE:
        # Every split of a normal piece into two normal pieces is a merge, ranked by the merged
        # piece's score (sentencepiece merges the adjacent pair whose result scores highest).
        merges = []
        for piece, i in normal.items():
            local = sorted(
                (
                    (piece[:k], piece[k:])
                    for k in range(1, len(piece))
                    if piece[:k] in normal and piece[k:] in normal
                ),
                key=lambda lr: (vocab[lr[0]], vocab[lr[1]]),
            )
            merges += [(m.pieces[i].score, left, right) for left, right in local]
        merges.sort(key=lambda x: (-x[0], len(x[1]), len(x[2])))
        model = {
            "type": "BPE",
            "dropout": None,
            "unk_token": m.pieces[ts.unk_id].piece,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": bool(ts.byte_fallback),
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[left, right] for _, left, right in merges],
        }
    else:
        model = {
            "type": "Unigram",
            "unk_id": ts.unk_id,
            "byte_fallback": bool(ts.byte_fallback),
            "vocab": [[p.piece, p.score] for p in m.pieces],
        }
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    prepend = [{"type": "Prepend", "prepend": "\u2581"}] if ns.add_dummy_prefix else []
    decoders = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if ns.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
            for t, (i, special) in sorted(added.items(), key=lambda kv: kv[1][0])
        ],
        "normalizer": {"type": "Sequence", "normalizers": prepend + [replace]},
        "pre_tokenizer": None,
        "post_processor": None,  # transformers sets BOS/EOS from add_bos_token / add_eos_token
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }
