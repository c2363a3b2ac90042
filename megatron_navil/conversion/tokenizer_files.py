"""Tokenizer files of an HF NaViL directory, with NaViL's 12 special tokens registered.

We copy the tokenizer files we find (a NaViL tokenizer directory: `tokenizer.model` +
`navil_tokenizer.json`; or an HF tokenizer: sentencepiece `tokenizer.model`, BPE `tokenizer.json`
/ `vocab.json` / `merges.txt`, configs and remote-code tokenizer modules) and make sure the special
tokens appear, at `first_special_token_id + row`, in the standard HF places: `added_tokens.json`,
`tokenizer_config.json` (`added_tokens_decoder`, `additional_special_tokens`),
`special_tokens_map.json`, and `tokenizer.json`'s `added_tokens` when that file exists. A source
that already places them elsewhere is an error: the embedding rows would not match.

What `AutoTokenizer.from_pretrained(out, use_fast=False)` (transformers 4.51, as the released
NaViL demo calls it) then gives, per source:
- OUR sentencepiece tokenizer (navil-tokenizer output, or a bare `tokenizer.model`:
  `tokenizer.model` + `navil_tokenizer.json`, no tokenizer_config.json of another class):
  `tokenizer_config.json` and `special_tokens_map.json` are (re)written by
  megatron_navil.conversion.hf_tokenizer for transformers' own slow `GemmaTokenizer`, no remote
  code: the same ids as NaViLTokenizer for text, special tokens and chat markers; bos/eos/unk/pad
  = its pieces; `add_bos_token` and the Jinja `chat_template` follow the model's chat style;
  `model_max_length` = the model's sequence length.
- Qwen3 (BPE `vocab.json`/`merges.txt`/`tokenizer.json`, `Qwen2Tokenizer`): the family's files,
  the 12 tokens added at `first_special_token_id + row`; built into transformers.
- InternLM2 (`tokenizer.model` + a tokenizer_config.json naming `InternLM2Tokenizer` through
  `auto_map`): the family's files as the source has them, tokenizer code included when the source
  has it (we never ship it); loading needs `trust_remote_code=True` and
  `tokenization_internlm2.py` in the directory (without it transformers refuses). The
  directory also loads as a NaViLTokenizer (`navil_tokenizer.json`).
The style and length come from the arguments, else from `out/config.json` when it is an HF NaViL
config (export_hf writes it first), else from the source's own tokenizer_config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from megatron_navil.checkpoint.tokenizer import TOKENIZER_FILES
from megatron_navil.config.model import SPECIAL_TOKENS
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.hf_tokenizer import chat_style, is_ours, sentencepiece_hf_files
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


def _load(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None


def special_token_claims(directory: Path) -> dict[str, list[tuple[int, str]]]:
    """token -> every (id, file) the directory's tokenizer files give a NaViL special token, in
    the order navil_tokenizer.json, added_tokens.json, tokenizer_config.json, tokenizer.json
    (transformers reads the last three, NaViLTokenizer the first: they must agree)."""
    d, claims = Path(directory), {}

    def note(token, i, name):
        if token in SPECIAL_TOKENS and i is not None:
            claims.setdefault(token, []).append((int(i), name))

    meta = _load(d / "navil_tokenizer.json") or {}
    for t, i in (meta.get("special_tokens") or {}).items():
        note(t, i, "navil_tokenizer.json")
    for t, i in (_load(d / "added_tokens.json") or {}).items():
        note(t, i, "added_tokens.json")
    for i, entry in (
        (_load(d / "tokenizer_config.json") or {}).get("added_tokens_decoder") or {}
    ).items():
        note(entry.get("content"), i, "tokenizer_config.json")
    for entry in (_load(d / "tokenizer.json") or {}).get("added_tokens") or []:
        note(entry.get("content"), entry.get("id"), "tokenizer.json")
    return claims


def special_token_ids(directory: Path) -> dict[str, tuple[int, str]]:
    """token -> (id, file that says so): the first claim of each NaViL special token."""
    return {t: c[0] for t, c in special_token_claims(directory).items()}


def first_special_token_id(directory: Path) -> Optional[int]:
    """Id of `</box>` per the directory's tokenizer files (None if they do not list it); the 12
    special tokens must be consecutive in SPECIAL_TOKENS order."""
    found = special_token_ids(directory)
    if SPECIAL_TOKENS[0] not in found:
        return None
    first = found[SPECIAL_TOKENS[0]][0]
    for row, token in enumerate(SPECIAL_TOKENS):
        if token in found and found[token][0] != first + row:
            i, name = found[token]
            raise ConversionError(
                f"{Path(directory) / name} gives {token} id {i}, but NaViL needs "
                f"{first + row} (special tokens are consecutive from </box> = {first})"
            )
    return first


def has_tokenizer(directory: Path) -> bool:
    return any(
        (Path(directory) / n).exists() for n in ("tokenizer.model", "tokenizer.json", "vocab.json")
    )


def check_tokenizer(src: Path, first_id: int) -> None:
    """The tokenizer files in `src` can carry the model's special tokens (checked before any
    conversion starts, so a mismatch fails fast)."""
    src = Path(src)
    if not has_tokenizer(src):
        raise ConversionError(
            f"{src} holds no tokenizer (tokenizer.model, tokenizer.json or vocab.json)"
        )
    existing = first_special_token_id(src)
    if existing is not None and existing != first_id:
        raise ConversionError(
            f"the tokenizer in {src} places </box> at id {existing}, the model at "
            f"{first_id} (llm.first_special_token_id); use the model's tokenizer"
        )


def write_tokenizer_files(
    src: Path,
    out: Path,
    first_id: int,
    *,
    chat_template: Optional[str] = None,
    model_max_length: Optional[int] = None,
) -> list[str]:
    """Copy `src`'s tokenizer files into `out` and register the special tokens; returns the
    names of the files written.

    `chat_template`: the model's chat style or template name (internlm2 / qwen3 /
    internlm2-chat / qwen3-chat; other names: no Jinja template) and `model_max_length`
    (tokens), for our sentencepiece tokenizers' tokenizer_config.json; None: from
    `out/config.json` (an HF NaViL config), else as the source's tokenizer_config.json has them."""
    src, out = Path(src), Path(out)
    check_tokenizer(src, first_id)
    style = _style(chat_template, out)
    src_config = _load(src / "tokenizer_config.json")
    written = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
            written.append(name)
    ids = {t: first_id + row for row, t in enumerate(SPECIAL_TOKENS)}

    added = _load(out / "added_tokens.json") or {}
    added.update(ids)
    _dump(out / "added_tokens.json", dict(sorted(added.items(), key=lambda kv: kv[1])))
    config = _load(out / "tokenizer_config.json") or {}
    decoder = config.setdefault("added_tokens_decoder", {})
    for t, i in ids.items():
        decoder[str(i)] = {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    extra = config.setdefault("additional_special_tokens", [])
    config["additional_special_tokens"] = extra + [t for t in SPECIAL_TOKENS if t not in extra]
    _dump(out / "tokenizer_config.json", config)
    smap = _load(out / "special_tokens_map.json") or {}
    extra = smap.get("additional_special_tokens") or []
    smap["additional_special_tokens"] = extra + [t for t in SPECIAL_TOKENS if t not in extra]
    _dump(out / "special_tokens_map.json", smap)
    if (out / "tokenizer.model").exists() and not (out / "navil_tokenizer.json").exists():
        written += _wrap_sentencepiece(out, first_id)
    fast = _load(out / "tokenizer.json")
    if fast is not None:
        entries = fast.setdefault("added_tokens", [])
        have = {e.get("content") for e in entries}
        entries += [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for t, i in ids.items()
            if t not in have
        ]
        _dump(out / "tokenizer.json", fast)
    ours = (out / "tokenizer.model").exists() and (out / "navil_tokenizer.json").exists()
    if ours and is_ours(src_config):
        if model_max_length is None:
            llm = _navil_config(out).get("llm_config") or {}
            model_max_length = llm.get("max_position_embeddings")
        from megatron_navil.data.tokenizer import TokenizerError

        try:
            files = sentencepiece_hf_files(out, style, model_max_length, previous=src_config)
        except TokenizerError as e:
            raise ConversionError(f"tokenizer {src}: {e}") from None
        for name, content in files.items():
            _dump(out / name, content)
            written.append(name)
    return sorted(
        set(written) | {"added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"}
    )


def _navil_config(out: Path) -> dict:
    """`out/config.json` when it is an HF NaViL model config (else {})."""
    try:
        d = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) and d.get("model_type") == "navil_chat" else {}


def _style(chat_template: Optional[str], out: Path) -> Optional[str]:
    """Our chat style of the model (None: a template we do not render, e.g. a released
    conversation template other than internlm2-chat / qwen3-chat, or no model config)."""
    name = chat_template if chat_template is not None else _navil_config(out).get("template")
    style = chat_style(name)
    if name is not None and style is None:
        log.info(
            "chat template %r has no Jinja rendering here; tokenizer_config.json keeps the "
            "source's chat_template",
            name,
        )
    return style


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _wrap_sentencepiece(out: Path, first_id: int) -> list[str]:
    """Add navil_tokenizer.json (megatron_navil's own tokenizer format) when the sentencepiece
    model's vocabulary ends exactly where the special tokens start (InternLM2: 92544)."""
    from megatron_navil.data.tokenizer import META_FILE, NaViLTokenizer

    tok = NaViLTokenizer(
        (out / "tokenizer.model").read_bytes(), origin="wrapped", source="tokenizer.model"
    )
    if tok.first_special_token_id != first_id:
        return []  # e.g. a sentencepiece model with extra added tokens: HF files only
    tok.save(str(out))
    return [META_FILE]
