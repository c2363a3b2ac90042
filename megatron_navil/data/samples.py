"""One sample's token ids and training targets, from its JSON and its images' token ids.

Layouts (B = BOS when `add_bos`, E = the tokenizer's EOS, [img] = layout.image_token_ids):
- caption:      B [img] caption E                  targets: caption tokens and E
- text:         B text E                           targets: every text token and E
- interleaved:  B text [img] text [img] ... E      targets: text tokens and E (not images)
- conversation: apply_chat_template(style) with [img] in place of each `<image>`; targets:
                assistant turns (content + <|im_end|>), as the template marks them. No extra E:
                <|im_end|> is the stop token the model learns.
Text pieces between `<image>` placeholders are encoded separately with allow_special=False
(web text cannot fake an image), exactly as navil-preprocess counted them (`text_tokens`).
`target[i] = 1` means "train the model to produce token i"; the batch builder shifts it into
the position-aligned loss_mask (position i-1 predicts token i).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from megatron_navil.data.chat_template import IMAGE_PLACEHOLDER, apply_chat_template


@dataclass
class SampleTokens:
    """One sample's token ids, its per-token target flags and where each image's tokens sit."""

    ids: list[int] = field(default_factory=list)
    target: list[int] = field(default_factory=list)
    """1 where the token is a training target, else 0; len == len(ids)."""
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    """Half-open [start, end) of each image's tokens, in image order."""

    def add(self, ids: Sequence[int], target: bool) -> None:
        self.ids.extend(ids)
        self.target.extend([int(target)] * len(ids))

    def truncate(self, limit: int) -> int:
        """Cut to at most `limit` tokens, never inside an image; returns the images kept."""
        cut = limit
        for s, e in self.image_spans:
            if s < cut < e:
                cut = s  # an image straddling the cut goes entirely
        kept = sum(1 for _, e in self.image_spans if e <= cut)
        del self.ids[cut:], self.target[cut:], self.image_spans[kept:]
        return kept


def build_sample_tokens(
    doc: dict, image_tokens: Sequence[Sequence[int]], tokenizer, chat_style: str, add_bos: bool
) -> SampleTokens:
    """Token layout of one sample (see the module docstring). `image_tokens[i]` are the ids of
    image i (from layout.image_token_ids with the grids the pixels will have)."""
    kind = doc.get("kind")
    out = SampleTokens()
    if kind == "conversation":
        enc = apply_chat_template(
            tokenizer, doc["conversations"], style=chat_style, image_tokens=list(image_tokens)
        )
        out.ids, out.target, out.image_spans = enc.ids, enc.loss_mask, enc.image_spans
        return out
    if kind not in ("caption", "text", "interleaved"):
        raise ValueError(f"sample {doc.get('key')!r}: unknown kind {kind!r}")
    if add_bos:
        out.add([tokenizer.bos_id], False)
    pieces = doc["text"].split(IMAGE_PLACEHOLDER)
    if kind in ("caption", "text"):
        # A caption's single image precedes its text (docs/data_format.md). A literal
        # placeholder in a caption or text only splits the text, as the preprocess count does.
        if len(image_tokens) > (kind == "caption"):
            raise ValueError(f"{kind} sample {doc.get('key')!r} has {len(image_tokens)} images")
        slots = [list(image_tokens)] + [[] for _ in pieces[1:]]
    elif len(pieces) - 1 != len(image_tokens):
        raise ValueError(
            f"sample {doc.get('key')!r}: {len(pieces) - 1} {IMAGE_PLACEHOLDER} "
            f"placeholders for {len(image_tokens)} images"
        )
    else:
        slots = [[]] + [[img] for img in image_tokens]
    for images, piece in zip(slots, pieces):
        for img in images:  # images that come before this text piece
            s = len(out.ids)
            out.add(img, False)
            out.image_spans.append((s, len(out.ids)))
        if piece:
            out.add(tokenizer.encode(piece, allow_special=False), True)
    out.add([tokenizer.eos_id], True)
    return out
