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
STYLES = ("internlm2", "qwen3")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


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
            raise ValueError(f"turn {i}: need role (system|user|assistant or human|gpt) and "
                             f"string content, got {t!r:.80}")
        out.append({"role": role, "content": content})
    return out


def apply_chat_template(tok, conversation: Sequence[Any], style: str = "internlm2",
                        image_tokens: Optional[Sequence[Sequence[int]]] = None,
                        add_generation_prompt: bool = False, empty_think: bool = True,
                        allow_special: bool = False) -> ChatEncoding:
    """Template and encode `conversation` with tokenizer `tok` (a NaViLTokenizer).

    `allow_special=False` (default) encodes special-token strings inside turns as plain text,
    so a literal "<img>" in user data cannot fake an image.
    """
    if style not in STYLES:
        raise ValueError(f"unknown chat style {style!r}; choose one of {', '.join(STYLES)}")
    turns = normalize_conversation(conversation)
    start, end = (tok.token_to_id("<|im_start|>") if "<|im_start|>" in tok.template_tokens
                  else None), (tok.token_to_id("<|im_end|>")
                               if "<|im_end|>" in tok.template_tokens else None)
    enc = ChatEncoding()
    images_used = 0

    def marker(tid: Optional[int], text: str, loss: bool) -> None:
        enc._add([tid] if tid is not None else tok.encode(text, allow_special=False), loss)

    def content(text: str, loss: bool) -> None:
        nonlocal images_used
        for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k > 0:
                s = len(enc.ids)
                if image_tokens is not None:
                    if images_used >= len(image_tokens):
                        raise ValueError(f"conversation has more {IMAGE_PLACEHOLDER} placeholders "
                                         f"than the {len(image_tokens)} image_tokens given")
                    enc._add(list(image_tokens[images_used]), False)
                enc.image_spans.append((s, len(enc.ids)))
                images_used += 1
            if piece:
                enc._add(tok.encode(piece, allow_special=allow_special), loss)

    if style == "internlm2":
        enc._add([tok.bos_id], False)
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=-1)
    for i, t in enumerate(turns):
        marker(start, "<|im_start|>", False)
        enc._add(tok.encode(t["role"] + "\n", allow_special=False), False)
        is_asst = t["role"] == "assistant"
        s = len(enc.ids)
        if is_asst and style == "qwen3" and empty_think and i == len(turns) - 1 and i > last_user:
            enc._add(tok.encode("<think>\n\n</think>\n\n", allow_special=False), True)
        content(t["content"], is_asst)
        marker(end, "<|im_end|>", is_asst)
        if is_asst:
            enc.assistant_spans.append((s, len(enc.ids)))
        enc._add(tok.encode("\n", allow_special=False), False)
    if add_generation_prompt:
        marker(start, "<|im_start|>", False)
        enc._add(tok.encode("assistant\n", allow_special=False), False)
    if image_tokens is not None and images_used != len(image_tokens):
        raise ValueError(f"{images_used} {IMAGE_PLACEHOLDER} placeholders but "
                         f"{len(image_tokens)} image_tokens given")
    return enc


def count_sample_tokens(tok, content: dict, style: str) -> int:
    """Text tokens of a sample's `{key}.json` content, images excluded (see data_format.md):
    conversation -> templated length; caption/text/interleaved -> encode() of the text
    segments between images (no BOS/EOS)."""
    if content.get("conversations") is not None:
        return len(apply_chat_template(tok, content["conversations"], style=style).ids)
    return sum(len(tok.encode(p, allow_special=False))
               for p in content["text"].split(IMAGE_PLACEHOLDER) if p)
