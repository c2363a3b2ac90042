"""A plain Hugging Face LLM directory (InternLM2 or Qwen3 layout, safetensors) for llm-to-navil.

Reads `config.json` with the usual HF field names and the safetensors weights (keys
`model.layers.{i}...`, `model.tok_embeddings` / `model.embed_tokens`, `output` / `lm_head`),
and turns the LLM's shape into the `llm` section of a NaViL model config whose other sections
(vision encoder, connector, experts, image settings) come from the chosen flavor.

Special tokens: NaViL's 12 tokens take consecutive ids from `first_special_token_id`. Default:
right after the tokenizer's vocabulary (InternLM2: the sentencepiece model's 92544 pieces ->
92544, as NaViL-2B; Qwen3: 151643 BPE tokens + 26 added tokens -> 151669, as NaViL-9B), or,
without tokenizer files, right after the embedding rows. The embedding grows to
`max(rows, first + 12)` rows: Qwen3's embedding (151936 rows) already has room, InternLM2's
(92544) gains 12 rows.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_navil.config.model import SPECIAL_TOKENS, NaViLModelConfig
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.hf_config import backbone_of, hf_llm_value
from megatron_navil.conversion.outputs import read_json
from megatron_navil.conversion.safetensors_io import SafetensorsDir
from megatron_navil.conversion.tokenizer_files import first_special_token_id as listed_first_id
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)

EMBED = {"internlm2": "model.tok_embeddings.weight", "qwen3": "model.embed_tokens.weight"}
HEAD = {"internlm2": "output.weight", "qwen3": "lm_head.weight"}
# Buffers some exports include; they are recomputed, never learned.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class HFLLM:
    """A plain HF LLM directory, validated."""

    dir: Path
    backbone: str
    config: dict
    weights: SafetensorsDir
    tied: bool

    @property
    def embedding_rows(self) -> int:
        return self.weights.info(EMBED[self.backbone])[0][0]


def read_hf_llm(directory: Path) -> HFLLM:
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"--hf-llm {directory} is not a directory")
    c = read_json(directory / "config.json", "an HF LLM directory needs its config.json")
    if c.get("model_type") == "navil_chat":
        raise ConversionError(f"{directory} is already a NaViL model; use hf-to-navil")
    backbone = backbone_of(c)
    weights = SafetensorsDir(directory)
    if EMBED[backbone] not in weights:
        raise ConversionError(
            f"{directory} has no {EMBED[backbone]}: not an {backbone} checkpoint in the HF layout"
        )
    tied = bool(c.get("tie_word_embeddings", False))
    if not tied and HEAD[backbone] not in weights:
        raise ConversionError(
            f"{directory} has no {HEAD[backbone]} and config.json does not tie the embeddings"
        )
    rows = weights.info(EMBED[backbone])[0][0]
    if c.get("vocab_size", rows) != rows:
        raise ConversionError(
            f"{directory}/config.json says vocab_size {c['vocab_size']}, but "
            f"{EMBED[backbone]} has {rows} rows"
        )
    if c.get("rope_scaling"):
        log.warning(
            "%s: rope_scaling %s is not modelled by NaViL (RoPE uses rope_theta only)",
            directory,
            c["rope_scaling"],
        )
    return HFLLM(directory, backbone, c, weights, tied)


def tokenizer_vocab_end(directory: Path) -> Optional[int]:
    """One past the largest token id the directory's tokenizer files define (None: no files)."""
    d, ends = Path(directory), []
    if (d / "tokenizer.model").exists():
        import sentencepiece as spm

        try:
            ends.append(
                spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).get_piece_size()
            )
        except (OSError, RuntimeError):
            raise ConversionError(f"{d / 'tokenizer.model'} is not a sentencepiece model") from None
    for name in ("tokenizer.json", "vocab.json", "added_tokens.json", "tokenizer_config.json"):
        if not (d / name).exists():
            continue
        try:
            data = json.loads((d / name).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConversionError(f"{d / name} is not valid JSON ({e})") from None
        ids: list[int] = []
        if name == "tokenizer.json":
            ids += list(((data.get("model") or {}).get("vocab") or {}).values())
            ids += [t["id"] for t in data.get("added_tokens") or []]
        elif name == "tokenizer_config.json":
            ids += [int(i) for i in data.get("added_tokens_decoder") or {}]
        else:
            ids += list(data.values())
        ints = [i for i in ids if isinstance(i, int)]
        if ints:
            ends.append(max(ints) + 1)
    return max(ends) if ends else None


def navil_config_for(
    llm: HFLLM, flavor: NaViLModelConfig, first_special_token_id: Optional[int] = None
) -> NaViLModelConfig:
    """The flavor's config with its `llm` section taken from the HF LLM."""
    if flavor.llm.backbone != llm.backbone:
        raise ConversionError(
            f"the flavor expects an {flavor.llm.backbone} backbone, but {llm.dir} "
            f"is {llm.backbone}; pick a {llm.backbone} flavor"
        )
    c, rows = llm.config, llm.embedding_rows
    first = first_special_token_id
    if first is None:
        first = listed_first_id(llm.dir)
    if first is None:
        end = tokenizer_vocab_end(llm.dir)
        first = end if end is not None else rows
    if first > rows:
        raise ConversionError(
            f"special tokens would start at id {first}, past the {rows} embedding "
            "rows of the LLM; pass --first-special-token-id <= rows"
        )
    heads = c.get("num_attention_heads")
    hidden = c.get("hidden_size")
    if not heads or not hidden or "num_hidden_layers" not in c or "intermediate_size" not in c:
        raise ConversionError(
            f"{llm.dir}/config.json lacks hidden_size / num_attention_heads / "
            "num_hidden_layers / intermediate_size"
        )
    new_llm = dataclasses.replace(
        flavor.llm,
        num_layers=c["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=c["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=c.get("num_key_value_heads") or heads,
        kv_channels=c.get("head_dim") or hidden // heads,
        qk_layernorm=llm.backbone == "qwen3",
        vocab_size=max(rows, first + len(SPECIAL_TOKENS)),
        first_special_token_id=first,
        rope_theta=float(hf_llm_value(c, "rope_theta")),
        norm_eps=float(hf_llm_value(c, "rms_norm_eps")),
        init_method_std=float(hf_llm_value(c, "initializer_range")),
    )
    changed = [
        f"{f.name} {getattr(flavor.llm, f.name)} -> {getattr(new_llm, f.name)}"
        for f in dataclasses.fields(new_llm)
        if getattr(flavor.llm, f.name) != getattr(new_llm, f.name)
    ]
    if changed:
        log.info("llm section from %s (differs from the flavor): %s", llm.dir, "; ".join(changed))
    return dataclasses.replace(flavor, llm=new_llm)
