"""Chat templates (InternLM2 and Qwen3 styles) that also return the assistant token spans.

InternLM2 (NaViL-2B):  <s><|im_start|>{role}\\n{content}<|im_end|>\\n ...
Qwen3 (NaViL-9B):      <|im_start|>{role}\\n{content}<|im_end|>\\n ...  (no BOS); like the HF
                       Qwen3 template for data without reasoning, a final assistant turn after the
                       last user turn starts with "<think>\\n\\n</think>\\n\\n" (`empty_think`).
Loss goes on each assistant turn's content and its closing <|im_end|> (the model must learn to
stop); role headers, user/system turns, images and the newline after <|im_end|> get none.
`<image>` placeholders in the content are replaced by the i-th entry of `image_tokens` (ids the
loader built, e.g. with NaViLTokenizer.image_token_ids), or by nothing when it is None; either
way `image_spans` says where each image sits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

IMAGE_PLACEHOLDER = "<image>"
CHAT_ENCODING_VERSION = 2
"""How conversations become ids; navil-preprocess records it with its token counts, and the
loader recounts conversations counted under another version. 1: role header and content
encoded apart; 2: whole-string tokenization between special tokens (see _Builder)."""
STYLES = ("internlm2", "qwen3")
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class ChatEncoding:
    """Token ids of a templated conversation and where loss and images go."""

    ids: list[int] = field(default_factory=list)
    """All token ids."""
    loss_mask: list[int] = field(default_factory=list)
    """1 where the token is part of an assistant turn (predict it), else 0; len == len(ids)."""
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)
    """Half-open [start, end) id ranges of assistant turns (content + <|im_end|>)."""
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    """Half-open id ranges of each image's tokens, in placeholder order (empty ranges when
    image_tokens was None)."""

    def _add(self, ids: Sequence[int], loss: bool) -> None:
        self.ids.extend(ids)
        self.loss_mask.extend([int(loss)] * len(ids))


def normalize_conversation(conversation: Sequence[Any]) -> list[dict[str, str]]:
    """Accept role/content or LLaVA from/value turns; return role/content dicts."""
    out = []
    for i, t in enumerate(conversation):
        role = _ROLES.get(str(t.get("role", t.get("from", ""))).lower())
        content = t.get("content", t.get("value"))
        if role is None or not isinstance(content, str):
            raise ValueError(
                f"turn {i}: need role (system|user|assistant or human|gpt) and "
                f"string content, got {t!r:.80}"
            )
        out.append({"role": role, "content": content})
    return out


class _Builder:
    """Appends a templated conversation's text and atomic ids to a ChatEncoding.

    Text is not encoded piece by piece: consecutive text (role header, content, unmatched
    markers) is collected into one run and encoded in one call when an atomic id (a template
    marker, image tokens) or the end comes, as transformers and the released NaViL chat code
    tokenize the whole rendered string between special tokens. Encoding the header and the
    content apart would differ from that: a dummy-prefix model (InternLM2's) would give each
    content its own leading '▁', and a piece such as "\n." could not form across "user\n" and
    ".". Loss goes on every id that stands for a loss character (an id spanning the header and
    the content predicts content, so it is trained).
    """

    def __init__(self, tok, allow_special: bool):
        self.tok, self.allow_special = tok, allow_special
        self.enc = ChatEncoding()
        self._text: list[str] = []
        self._loss: list[tuple[int, int]] = []  # character ranges of the run that get loss
        self._len = 0
        self._anchors: list[tuple[list, int, int, bool]] = []  # (target, slot, char, is_end)

    def text(self, s: str, loss: bool) -> None:
        if s:
            if loss:
                self._loss.append((self._len, self._len + len(s)))
            self._text.append(s)
            self._len += len(s)

    def ids(self, ids: Sequence[int], loss: bool) -> None:
        self.flush()
        self.enc._add(ids, loss)

    def anchor(self, target: list, slot: int, is_end: bool = False) -> None:
        """Set `target[slot]` to the id index where the text added next starts (is_end=False:
        the first id covering a later character) or where the text added so far ends
        (is_end=True: after the last id covering an earlier character), once it is encoded."""
        self._anchors.append((target, slot, self._len, is_end))

    def flush(self) -> None:
        text, base = "".join(self._text), len(self.enc.ids)
        inside = any(0 < char < len(text) for _, _, char, _ in self._anchors)
        if text and (inside or self._loss not in ([], [(0, len(text))])):
            ids, spans = self.tok.encode_with_offsets(text, allow_special=self.allow_special)
            # an empty range (a byte-fallback id) stands for the character it starts
            spans = [(s, max(e, s + 1)) for s, e in spans]
            for i, (s, e) in zip(ids, spans):
                self.enc._add([i], any(ls < e and s < le for ls, le in self._loss))
        else:  # one loss value, anchors only at the ends: no offsets needed
            self.enc._add(
                self.tok.encode(text, allow_special=self.allow_special) if text else [],
                bool(self._loss),
            )
            spans = None
        for target, slot, char, is_end in self._anchors:
            if spans is None:
                k = 0 if char == 0 else len(self.enc.ids) - base
            elif is_end:  # after the last id that covers a character before `char`
                k = sum(1 for s, _ in spans if s < char)
            else:  # at the first id that covers a character at or after `char`
                k = sum(1 for _, e in spans if e <= char)
            target[slot] = base + k
        self._text, self._loss, self._len, self._anchors = [], [], 0, []


def apply_chat_template(
    tok,
    conversation: Sequence[Any],
    style: str = "internlm2",
    image_tokens: Optional[Sequence[Sequence[int]]] = None,
    add_generation_prompt: bool = False,
    empty_think: bool = True,
    allow_special: bool = False,
) -> ChatEncoding:
    """Template and encode `conversation` with tokenizer `tok` (a NaViLTokenizer).

    The ids are those of the whole rendered string (see _Builder), as transformers'
    `apply_chat_template` of our exported tokenizer gives them. `allow_special=False` (default)
    encodes special-token strings inside turns as plain text, so a literal "<img>" in user data
    cannot fake an image (the one intended difference from whole-string tokenization).
    """
    if style not in STYLES:
        raise ValueError(f"unknown chat style {style!r}; choose one of {', '.join(STYLES)}")
    turns = normalize_conversation(conversation)
    b = _Builder(tok, allow_special)
    enc = b.enc
    images_used = 0

    def marker(text: str, loss: bool) -> None:
        if text in tok.template_tokens:
            b.ids([tok.token_to_id(text)], loss)
        else:  # the model has no such piece: the marker is ordinary text, as in transformers
            b.text(text, loss)

    def content(text: str, loss: bool) -> None:
        nonlocal images_used
        for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k > 0:
                b.flush()  # image tokens are special: the rendered string splits here
                s = len(enc.ids)
                if image_tokens is not None:
                    if images_used >= len(image_tokens):
                        raise ValueError(
                            f"conversation has more {IMAGE_PLACEHOLDER} placeholders "
                            f"than the {len(image_tokens)} image_tokens given"
                        )
                    enc._add(list(image_tokens[images_used]), False)
                enc.image_spans.append((s, len(enc.ids)))
                images_used += 1
            b.text(piece, loss)

    if style == "internlm2":
        b.ids([tok.bos_id], False)
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=-1)
    for i, t in enumerate(turns):
        marker("<|im_start|>", False)
        b.text(t["role"] + "\n", False)
        is_asst = t["role"] == "assistant"
        span = [0, 0]
        if is_asst:
            b.anchor(span, 0)
        if is_asst and style == "qwen3" and empty_think and i == len(turns) - 1 and i > last_user:
            b.text("<think>\n\n</think>\n\n", True)
        content(t["content"], is_asst)
        marker("<|im_end|>", is_asst)
        if is_asst:
            b.anchor(span, 1, is_end=True)
            enc.assistant_spans.append(span)
        b.text("\n", False)
    if add_generation_prompt:
        marker("<|im_start|>", False)
        b.text("assistant\n", False)
    b.flush()
    enc.assistant_spans = [tuple(s) for s in enc.assistant_spans]
    if image_tokens is not None and images_used != len(image_tokens):
        raise ValueError(
            f"{images_used} {IMAGE_PLACEHOLDER} placeholders but "
            f"{len(image_tokens)} image_tokens given"
        )
    return enc


def count_sample_tokens(tok, content: dict, style: str) -> int:
    """Text tokens of a sample's `{key}.json` content, images excluded (see data_format.md):
    conversation -> templated length; caption/text/interleaved -> encode() of the text
    segments between images (no BOS/EOS)."""
    if content.get("conversations") is not None:
        return len(apply_chat_template(tok, content["conversations"], style=style).ids)
    return sum(
        len(tok.encode(p, allow_special=False))
        for p in content["text"].split(IMAGE_PLACEHOLDER)
        if p
    )
