"""Parse one input record into a canonical sample, or reject it with a reason code.

Kinds (auto-detected per record, or forced with --format):
- caption:      {"image": path, "text"|"caption": str}
- conversation: LLaVA style {"image": path | [paths] | "images": [paths],
                 "conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
- interleaved:  {"images": [paths], "text": "... <image> ... <image> ..."} or the OBELICS/MMC4
                 layout {"images": [path|null, ...], "texts": [str|null, ...]} (parallel lists)
- text:         {"text": str}
`<image>` placeholders must match the number of images exactly (`placeholder_mismatch`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

# The loader's own constants: what the writer accepts is what the loader understands.
from megatron_navil.data.chat_template import _ROLES, IMAGE_PLACEHOLDER

_KNOWN_KEYS = {"image", "images", "text", "texts", "caption", "conversations", "_sidecar"}


class Reject(Exception):
    """A sample that cannot be used: `reason` is a stable code, `detail` a human hint."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Sample:
    """A parsed record: text content plus image references (not yet loaded)."""

    kind: str
    """caption | conversation | interleaved | text."""
    image_refs: list[str] = field(default_factory=list)
    """Image paths as written in the input (relative to the image root, or absolute)."""
    image_paths: list[str] = field(default_factory=list)
    """Resolved absolute paths, same order."""
    text: Optional[str] = None
    """Caption / plain text / interleaved text with `<image>` placeholders."""
    conversations: Optional[list[dict[str, str]]] = None
    """[{"role": "system"|"user"|"assistant", "content": str}] with `<image>` placeholders."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Input fields we do not interpret (ids, urls, ...), carried into the sample JSON."""

    def content_json(self) -> dict[str, Any]:
        """The text part of the `{key}.json` member."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.conversations is not None:
            out["conversations"] = self.conversations
        else:
            out["text"] = self.text
        return out


def parse_record(line: Optional[str], obj: Any, base_dir: str, forced: Optional[str]) -> Sample:
    """Parse a raw JSONL line or a pre-parsed object into a Sample. Raises Reject."""
    if line is not None:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise Reject("malformed_json", f"{e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise Reject("malformed_record", f"expected a JSON object, got {type(obj).__name__}")
    kind = forced or _detect(obj)
    sample = _BUILDERS[kind](obj)
    sample.extra = {k: v for k, v in obj.items() if k not in _KNOWN_KEYS}
    sample.image_paths = [
        ref if os.path.isabs(ref) else os.path.join(base_dir, ref) for ref in sample.image_refs
    ]
    _check_placeholders(sample)
    return sample


def _detect(obj: dict) -> str:
    if "conversations" in obj:
        return "conversation"
    if "texts" in obj or "images" in obj:
        return "interleaved"
    if "image" in obj or "_sidecar" in obj:
        text = obj.get("text", obj.get("caption"))
        # A single image whose text places it explicitly is an interleaved sample of one image.
        if isinstance(text, str) and IMAGE_PLACEHOLDER in text:
            return "interleaved"
        return "caption"
    if "text" in obj:
        return "text"
    raise Reject("malformed_record", f"cannot tell the sample kind from keys {sorted(obj)[:8]}")


def _str(obj: dict, *names: str) -> str:
    for n in names:
        if n in obj:
            v = obj[n]
            if not isinstance(v, str):
                raise Reject(
                    "malformed_record", f"field {n!r} must be a string, got {type(v).__name__}"
                )
            return v
    raise Reject("malformed_record", f"missing field {' or '.join(repr(n) for n in names)}")


def _nonempty(text: str, what: str) -> str:
    if not text.replace(IMAGE_PLACEHOLDER, "").strip():
        raise Reject("empty_text", f"{what} is empty")
    return text


def _caption(obj: dict) -> Sample:
    if "_sidecar" in obj:  # image folder: the caption is the same-stem .txt next to the image
        try:
            with open(obj["_sidecar"], "rb") as f:
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            raise Reject(
                "missing_caption", f"no sidecar {os.path.basename(obj['_sidecar'])}"
            ) from None
        except UnicodeDecodeError as e:
            raise Reject("malformed_record", f"sidecar caption is not UTF-8: {e}") from None
        text = text.strip()
    else:
        text = _str(obj, "text", "caption")
    return Sample("caption", image_refs=[_str(obj, "image")], text=_nonempty(text, "caption"))


def _text(obj: dict) -> Sample:
    return Sample("text", text=_nonempty(_str(obj, "text"), "text"))


def _image_list(obj: dict) -> list[str]:
    if "images" in obj:
        refs = obj["images"]
    elif "image" in obj:
        refs = obj["image"] if isinstance(obj["image"], list) else [obj["image"]]
    else:
        return []
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise Reject("malformed_record", "images must be a list of non-empty path strings")
    return refs


def _conversation(obj: dict) -> Sample:
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise Reject("malformed_record", "conversations must be a non-empty list")
    conv = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise Reject("malformed_record", f"turn {i} is not an object")
        role = _ROLES.get(str(t.get("from", t.get("role", ""))).lower())
        if role is None:
            raise Reject("malformed_record", f"turn {i}: 'from' must be human|gpt|system")
        conv.append({"role": role, "content": _str(t, "value", "content")})
    if not any(t["role"] == "assistant" and t["content"].strip() for t in conv):
        raise Reject("empty_text", "no non-empty gpt/assistant turn")
    return Sample("conversation", image_refs=_image_list(obj), conversations=conv)


def _interleaved(obj: dict) -> Sample:
    if "texts" in obj:  # OBELICS/MMC4 parallel lists: position k holds an image or a text
        texts, images = obj["texts"], obj.get("images", [None] * len(obj["texts"]))
        if not (isinstance(texts, list) and isinstance(images, list) and len(texts) == len(images)):
            raise Reject("malformed_record", "texts and images must be lists of equal length")
        parts, refs = [], []
        for k, (t, im) in enumerate(zip(texts, images)):
            if (t is None) == (im is None) or not isinstance(t if im is None else im, str):
                raise Reject("malformed_record", f"position {k} must hold exactly one string")
            if im is not None:
                refs.append(im)
                parts.append(IMAGE_PLACEHOLDER)
            else:
                parts.append(t)
        text = "\n".join(parts)
    else:
        refs = _image_list(obj)
        text = _str(obj, "text", "caption")
    return Sample("interleaved", image_refs=refs, text=_nonempty(text, "text"))


_BUILDERS = {
    "caption": _caption,
    "conversation": _conversation,
    "interleaved": _interleaved,
    "text": _text,
}


def _check_placeholders(s: Sample) -> None:
    if s.kind == "caption":
        return  # the image position is implicit (before the caption); no placeholder expected
    texts = [t["content"] for t in s.conversations] if s.conversations is not None else [s.text]
    n = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    if n != len(s.image_refs):
        raise Reject(
            "placeholder_mismatch",
            f"{n} {IMAGE_PLACEHOLDER} placeholder(s) for {len(s.image_refs)} image(s)",
        )
