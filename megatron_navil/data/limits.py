"""Size rules for untrusted samples, shared by navil-preprocess and the loader.

JSON: navil-preprocess rejects an input JSONL line, and never writes a sample JSON member, larger
than `--max-json-bytes` (default 1 MiB: a NaViL sample is at most a few thousand tokens of text;
a long interleaved document is ~100 KB). The manifest records the value and the loader skips a
sample whose indexed JSON member is larger than the dataset's limit (capped at
MAX_JSON_BYTES_CAP, whatever a manifest claims) before reading it: no sample costs more than
that in memory and tokenizer time per epoch.

Token counts: every text token comes from at least one byte of the sample's JSON. Tokenizers
with byte fallback (sentencepiece) or byte-level BPE emit at most one id per UTF-8 byte of
text; the template tokens of a conversation (BOS, `<|im_start|>`, the role, newlines,
`<|im_end|>`, Qwen3's empty think block once) are fewer than the bytes of the JSON that spells
the turn (`{"role": "assistant", "content": ""}` is 36 bytes); an `<image>` placeholder costs 7
bytes and 0 text tokens. So `text_tokens <= json_bytes + TOKEN_SLACK` for any honest index; a
larger count is a lying or broken index (or tokenizer), and the sample is refused with its key
instead of stopping training where the builder finds the length differs from the plan.
"""

from __future__ import annotations

DEFAULT_MAX_JSON_BYTES = 1 << 20
"""navil-preprocess's default `--max-json-bytes`, and the loader's limit for a manifest that
does not record one."""
MAX_JSON_BYTES_CAP = 64 << 20
"""Largest `--max-json-bytes` navil-preprocess accepts and the loader honours."""
TOKEN_SLACK = 64
"""Template tokens that may exceed the JSON's bytes (BOS + the think block need ~8)."""
IMAGE_BYTES_PER_PIXEL = 8
IMAGE_BYTES_SLACK = 4 << 20
"""An image member may have at most IMAGE_BYTES_PER_PIXEL bytes per pixel the limit allows,
plus this for metadata (EXIF, ICC, XMP): stored PNGs are at most ~3 bytes per pixel even
uncompressed, JPEGs and WebPs less. Bounds what a lying index makes the loader read."""


def max_json_bytes(manifest_settings: dict) -> int:
    """The JSON member limit a dataset was made with (capped; the default when absent)."""
    value = manifest_settings.get("max_json_bytes", DEFAULT_MAX_JSON_BYTES)
    if not isinstance(value, int) or value < 1:
        return DEFAULT_MAX_JSON_BYTES
    return min(value, MAX_JSON_BYTES_CAP)


def implausible_tokens(text_tokens: int, json_bytes: int) -> bool:
    """More text tokens than the sample's JSON bytes can produce (see the module docstring)."""
    return text_tokens > json_bytes + TOKEN_SLACK


def max_image_bytes(max_pixels: int) -> int:
    """Most bytes an image member under a `max_pixels` limit may have."""
    return IMAGE_BYTES_PER_PIXEL * max_pixels + IMAGE_BYTES_SLACK
