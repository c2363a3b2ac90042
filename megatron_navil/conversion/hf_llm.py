"""A plain Hugging Face LLM directory (InternLM2 or Qwen3 layout, safetensors; `.bin` pickles only
with `trust_pickle`, see hf_weights.py) for llm-to-navil.

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
from typing import Optional, Union

from megatron_navil.backbones import Backbone
from megatron_navil.config.model import SPECIAL_TOKENS, NaViLModelConfig
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.hf_config import backbone_of, llm_shape_from_hf
from megatron_navil.conversion.hf_weights import PickleDir, open_hf_weights
from megatron_navil.conversion.outputs import read_json
from megatron_navil.conversion.safetensors_io import SafetensorsDir
from megatron_navil.conversion.tokenizer_files import first_special_token_id as listed_first_id
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)

# Buffers some exports include; they are recomputed, never learned.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class HFLLM:
    """A plain HF LLM directory, validated."""

    dir: Path
    family: Backbone
    config: dict
    weights: Union[SafetensorsDir, PickleDir]
    tied: bool

    @property
    def backbone(self) -> str:
        """The family's name (`llm.backbone`)."""
        return self.family.name

    @property
    def embed_key(self) -> str:
        return self.family.names.embed

    @property
    def head_key(self) -> str:
        """Where the output projection is read from: the embedding when they are tied."""
        return self.embed_key if self.tied else self.family.names.head

    @property
    def embedding_rows(self) -> int:
        return self.weights.info(self.embed_key)[0][0]


def read_hf_llm(directory: Path, trust_pickle: bool = False) -> HFLLM:
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"--hf-llm {directory} is not a directory")
    c = read_json(directory / "config.json", "an HF LLM directory needs its config.json")
    if c.get("model_type") == "navil_chat":
        raise ConversionError(f"{directory} is already a NaViL model; use hf-to-navil")
    family = backbone_of(c)
    weights = open_hf_weights(directory, trust_pickle)
    embed, head = family.names.embed, family.names.head
    if embed not in weights:
        raise ConversionError(
            f"{directory} has no {embed}: not an {family.display_name} checkpoint in the HF layout"
        )
    tied = bool(c.get("tie_word_embeddings", False))
    if not tied and head not in weights:
        raise ConversionError(
            f"{directory} has no {head} and config.json does not tie the embeddings"
        )
    rows = weights.info(embed)[0][0]
    if c.get("vocab_size", rows) != rows:
        raise ConversionError(
            f"{directory}/config.json says vocab_size {c['vocab_size']}, but "
            f"{embed} has {rows} rows"
        )
    if c.get("rope_scaling"):
        log.warning(
            "%s: rope_scaling %s is not modelled by NaViL (RoPE uses rope_theta only)",
            directory,
            c["rope_scaling"],
        )
    return HFLLM(directory, family, c, weights, tied)


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
    new_llm = dataclasses.replace(
        flavor.llm,
        **llm_shape_from_hf(c, llm.family, f"{llm.dir}/config.json: "),
        vocab_size=max(rows, first + len(SPECIAL_TOKENS)),
        first_special_token_id=first,
    )
    changed = [
        f"{f.name} {getattr(flavor.llm, f.name)} -> {getattr(new_llm, f.name)}"
        for f in dataclasses.fields(new_llm)
        if getattr(flavor.llm, f.name) != getattr(new_llm, f.name)
    ]
    if changed:
        log.info("llm section from %s (differs from the flavor): %s", llm.dir, "; ".join(changed))
    return dataclasses.replace(flavor, llm=new_llm)
