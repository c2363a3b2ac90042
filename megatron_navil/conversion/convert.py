"""In-memory conversion of a whole HF release-layout state dict to the canonical Megatron layout.

Strict: every HF key must be consumed by exactly one mapping and every Megatron key produced,
else a KeyError names the offending keys. The streaming, any-layout,
on-disk tools (navil-convert) are built on the same mappings.
"""

from __future__ import annotations

import torch

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.conversion.registry import expand, mappings


def _pairs(cfg: NaViLModelConfig, padded_vocab: int):
    for m in mappings(cfg, padded_vocab):
        for meg, hf in expand(m, cfg):
            yield m.transform, meg, hf


def _check_consumed(source: dict, used: set, side: str) -> None:
    extra = sorted(set(source) - used)
    if extra:
        shown = ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else "")
        raise KeyError(
            f"{len(extra)} {side} key(s) not mapped by the NaViL registry: {shown}; "
            "the checkpoint does not match the model config"
        )


def hf_to_megatron(
    hf: dict[str, torch.Tensor], cfg: NaViLModelConfig, padded_vocab: int
) -> dict[str, torch.Tensor]:
    out, used = {}, set()
    for transform, meg, names in _pairs(cfg, padded_vocab):
        missing = [n for n in names if n not in hf]
        if missing:
            raise KeyError(f"HF checkpoint lacks {', '.join(missing)} (needed for {meg})")
        out[meg] = transform.to_megatron([hf[n] for n in names])
        used.update(names)
    _check_consumed(hf, used, "HF")
    return out
