"""NaViL tokenizer: a sentencepiece model plus NaViL's 12 special tokens at consecutive ids.

The special tokens (megatron_navil.config.SPECIAL_TOKENS, in that order) take ids
`first_special_token_id + row`, right after the sentencepiece vocabulary:
- a freshly trained model is trained with `vocab_size - 12` pieces, so the specials are the LAST
  12 ids (`first_special_token_id = vocab_size - 12`);
- a wrapped model (e.g. InternLM2's tokenizer.model, 92544 pieces) gets them appended
  (`first_special_token_id = 92544`, matching NaViL-2B).
They live outside the sentencepiece model: `encode` splits the text on them first, so they are
never split, whatever the model learned. Chat-template markers (`<|im_start|>`, `<|im_end|>`,
`<think>`, `</think>`) are matched the same way when the model has them as pieces.

Depends only on sentencepiece and megatron_navil.config so the training loader can use it as is.
On disk (a directory): `tokenizer.model` + `navil_tokenizer.json` (docs/data_format.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable, Optional, Sequence

import sentencepiece as spm

from megatron_navil.config import SPECIAL_TOKENS, ConfigError
from megatron_navil.errors import UserError
from megatron_navil.utils.files import write_bytes_atomic, write_json_atomic

TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
"""Chat-template markers reserved as atomic pieces when training a fresh model."""
META_FILE = "navil_tokenizer.json"
MODEL_FILE = "tokenizer.model"


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be used; the message says which and why."""


class NaViLTokenizer:
    """encode/decode with NaViL special tokens; chat templates via `apply_chat_template`."""

    def __init__(self, model_proto: bytes, origin: str = "wrapped", source: str = ""):
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.origin, self.source = origin, source
        self.base_vocab_size = self.sp.get_piece_size()
        self.first_special_token_id = self.base_vocab_size
        self.vocab_size = self.base_vocab_size + len(SPECIAL_TOKENS)
        self.special_tokens = {
            t: self.first_special_token_id + i for i, t in enumerate(SPECIAL_TOKENS)
        }
        # Template markers the model owns as real pieces (not unknown) are matched atomically.
        self.template_tokens = {
            t: self.sp.piece_to_id(t)
            for t in TEMPLATE_TOKENS
            if self.sp.piece_to_id(t) != self.sp.unk_id()
        }
        self._atomic = {**self.template_tokens, **self.special_tokens}
        self._id_to_atomic = {v: k for k, v in self._atomic.items()}
        self._split_all = _splitter(self._atomic)
        self._split_template = _splitter(self.template_tokens)
        self.sha256 = hashlib.sha256(model_proto).hexdigest()

    # ------------------------------------------------------------------ ids
    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The model's pad piece, or eos when it has none (InternLM2 pads with </s>)."""
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    def special_token_id(self, name: str) -> int:
        """Id of a NaViL special token (e.g. "<IMG_CONTEXT>") or a template marker."""
        try:
            return self._atomic[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not a special token of this tokenizer; known: "
                f"{', '.join(self._atomic)}"
            ) from None

    def token_to_id(self, piece: str) -> int:
        return self._atomic[piece] if piece in self._atomic else self.sp.piece_to_id(piece)

    def id_to_token(self, i: int) -> str:
        return self._id_to_atomic[i] if i in self._id_to_atomic else self.sp.id_to_piece(i)

    # ------------------------------------------------------------------ text
    def _parts(self, text: str, allow_special: bool) -> Iterable[tuple[int, str, Optional[int]]]:
        """(start, part, atomic id or None) of `text` split on the atomic strings that count:
        every special token and template marker, or only the markers (allow_special=False)."""
        splitter = self._split_all if allow_special else self._split_template
        pos = 0
        for part in splitter.split(text) if splitter else [text]:
            if part:
                atomic = self._atomic.get(part)
                keep = atomic is not None and (allow_special or part in self.template_tokens)
                yield pos, part, atomic if keep else None
            pos += len(part)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text` (no BOS/EOS). Special-token strings become their single id
        unless `allow_special=False` (then they are ordinary text: use it for untrusted web
        text that may contain e.g. a literal "<img>"); template markers stay atomic."""
        ids: list[int] = []
        for _, part, atomic in self._parts(text, allow_special):
            if atomic is not None:
                ids.append(atomic)
            else:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_with_offsets(
        self,
        text: str,
        allow_special: bool = True,
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text, allow_special)` and, per id, the half-open character range of `text`
        it stands for. Byte-fallback ids of one character: all but the last have an empty range
        at the character's start (sentencepiece gives the surface to the last byte)."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for pos, part, atomic in self._parts(text, allow_special):
            if atomic is not None:
                ids.append(atomic)
                spans.append((pos, pos + len(part)))
                continue
            # sentencepiece reports UTF-8 byte offsets; map them to character offsets.
            char_at = [len(part)] * (len(part.encode("utf-8")) + 1)
            b = 0
            for c, ch in enumerate(part):
                n = len(ch.encode("utf-8"))
                char_at[b : b + n] = [c] * n
                b += n
            for piece in self.sp.encode(part, out_type="proto").pieces:
                ids.append(piece.id)
                spans.append((pos + char_at[piece.begin], pos + char_at[piece.end]))
        return ids, spans

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of encode (special ids decode to their strings)."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self._id_to_atomic:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self._id_to_atomic[i])
            elif 0 <= i < self.base_vocab_size:
                run.append(i)
            else:
                raise ValueError(f"token id {i} outside the vocabulary (size {self.vocab_size})")
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def image_token_ids(self, scales: Sequence[tuple[int, int]]) -> list[int]:
        """NaViL's token layout of one image: `<img>`, then per scale (smallest first) per row
        of merged tokens `<IMG_CONTEXT>` x cols + `<IMG_LINE_BREAK>`, then `<IMG_FRAME_BREAK>`;
        finally `</img>`. `scales` = [(rows, cols)] of merged (2x2) tokens per scale."""
        t = self.special_tokens
        ids = [t["<img>"]]
        for rows, cols in scales:
            for _ in range(rows):
                ids.extend([t["<IMG_CONTEXT>"]] * cols)
                ids.append(t["<IMG_LINE_BREAK>"])
            ids.append(t["<IMG_FRAME_BREAK>"])
        ids.append(t["</img>"])
        return ids

    def apply_chat_template(self, conversation, style: str = "internlm2", **kwargs):
        """Encode a conversation; see megatron_navil.data.chat_template.apply_chat_template."""
        from megatron_navil.data.chat_template import apply_chat_template

        return apply_chat_template(self, conversation, style=style, **kwargs)

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict:
        return {
            "format_version": 1,
            "origin": self.origin,
            "source": self.source,
            "model_file": MODEL_FILE,
            "model_sha256": self.sha256,
            "base_vocab_size": self.base_vocab_size,
            "vocab_size": self.vocab_size,
            "first_special_token_id": self.first_special_token_id,
            "special_tokens": self.special_tokens,
            "template_tokens": self.template_tokens,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
        }

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        write_bytes_atomic(os.path.join(directory, MODEL_FILE), self._proto)
        write_json_atomic(os.path.join(directory, META_FILE), self.metadata(), indent=2)

    @classmethod
    def load(cls, path: str) -> "NaViLTokenizer":
        """A directory written by `save`/navil-tokenizer, or a bare sentencepiece .model file
        (wrapped: the special tokens are appended after its vocabulary)."""
        if os.path.isdir(path):
            meta_path = os.path.join(path, META_FILE)
            if not os.path.isfile(meta_path):
                raise TokenizerError(
                    f"{path} has no {META_FILE}; make it with navil-tokenizer "
                    "or pass the .model file"
                )
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            proto = _read(os.path.join(path, meta.get("model_file", MODEL_FILE)))
            tok = cls(proto, origin=meta.get("origin", "wrapped"), source=meta.get("source", ""))
            if tok.sha256 != meta.get("model_sha256"):
                raise TokenizerError(
                    f"{path}: {MODEL_FILE} does not match {META_FILE} "
                    "(sha256 differs); re-create the tokenizer directory"
                )
            return tok
        return cls(_read(path), origin="wrapped", source=os.path.abspath(path))


def tokenizer_vocabulary(path: str) -> tuple[int, int]:
    """(vocab_size, first_special_token_id) of a NaViL tokenizer directory (from its metadata)
    or a bare sentencepiece .model file (wrapped), without building an encoder for a directory."""
    meta_path = os.path.join(path, META_FILE)
    if os.path.isdir(path) and os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            return int(meta["vocab_size"]), int(meta["first_special_token_id"])
        except (OSError, ValueError, KeyError) as e:
            raise TokenizerError(
                f"{meta_path} is unreadable ({e}); re-create it with navil-tokenizer"
            ) from None
    tok = NaViLTokenizer.load(path)
    return tok.vocab_size, tok.first_special_token_id


def configured_vocabulary(path: Optional[str]) -> Optional[tuple[int, int]]:
    """`tokenizer_vocabulary` of navil-pretrain's --tokenizer-model (None without one), for
    PretrainConfig.resolved_model; an unreadable tokenizer is a ConfigError naming the flag."""
    if path is None:
        return None
    try:
        return tokenizer_vocabulary(path)
    except (TokenizerError, OSError) as e:
        raise ConfigError(f"--tokenizer-model {path}: {e}") from None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            proto = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer model {path!r}: {e.strerror}") from None
    try:
        spm.SentencePieceProcessor(model_proto=proto)
    except Exception:
        raise TokenizerError(f"{path!r} is not a sentencepiece model") from None
    return proto


def _splitter(tokens: dict[str, int]) -> Optional[re.Pattern]:
    if not tokens:
        return None
    alts = sorted(tokens, key=len, reverse=True)  # longest first: no marker shadows another
    return re.compile("(" + "|".join(re.escape(t) for t in alts) + ")")


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
    max_texts: int = 2_000_000,
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    seed_text_limit: int = 65536,
) -> NaViLTokenizer:
    """Train a fresh model whose final vocab (specials included) is at most `vocab_size`.

    The sentencepiece model gets `vocab_size - 12` pieces (fewer when the corpus is too small
    to support them: `hard_vocab_limit=False`), so the 12 specials are the last ids.
    Identity normalisation, no dummy prefix and kept whitespace make decode(encode(x)) == x.
    """
    import io

    base = vocab_size - len(SPECIAL_TOKENS)
    reserved = 4 + len(TEMPLATE_TOKENS) + (256 if byte_fallback else 0)
    if base <= reserved:
        raise TokenizerError(
            f"vocab size {vocab_size} leaves no room for learned pieces "
            f"(need > {reserved + len(SPECIAL_TOKENS)} with byte fallback)"
        )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=base,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        hard_vocab_limit=False,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=list(TEMPLATE_TOKENS),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        input_sentence_size=max_texts,
        shuffle_input_sentence=True,
        max_sentence_length=seed_text_limit,
        minloglevel=2,
        num_threads=os.cpu_count() or 1,
    )
    return NaViLTokenizer(model.getvalue(), origin="trained")
