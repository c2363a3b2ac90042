"""Which model a plan is for: a flavor, or an LLM size with the encoder from the joint law.

Sizes follow the paper: the LLM size is the base LLM's parameter count (embeddings and LM head
included, visual experts excluded: what the model is initialised from), the vision size the
encoder's. A model is a run config's model section (a flavor + fields set on it), so a plan
prints the navil-pretrain arguments that build exactly the planned model.
"""

from __future__ import annotations

import math
from typing import Optional

from megatron_navil.config.base import ConfigError
from megatron_navil.config.flavors import (
    PAPER_LAW,
    ScalingLaw,
    get_flavor,
    propose_vision_config,
)
from megatron_navil.config.model import NaViLModelConfig, VisionConfig
from megatron_navil.config.model_section import ModelSection

FAMILY_FLAVOR = {"internlm2": "navil-2b", "qwen3": "navil-9b"}
"""The released flavor whose vocabulary, norms and expert modes an LLM of a family takes."""
ASPECT = 100.0
"""Target width / depth of a proposed LLM (NaViL-2B: 85, NaViL-9B: 114)."""


def llm_size_billion(cfg: NaViLModelConfig) -> float:
    """The base LLM's parameters (billions): the paper's LLM size."""
    return cfg.llm.num_parameters()[0] / 1e9


def vision_size_billion(cfg: NaViLModelConfig) -> float:
    return cfg.vision.num_parameters() / 1e9


def propose_llm_fields(params_billion: float, family: str = "qwen3") -> dict[str, int]:
    """LLM fields of about `params_billion` parameters in the family's style: 128-wide heads (a
    multiple of 4), up to 8 KV groups, the family's FFN ratio, width/depth near ASPECT."""
    if params_billion <= 0:
        raise ConfigError(f"--llm-size must be positive, got {params_billion}")
    base = get_flavor(FAMILY_FLAVOR[family]).llm
    ratio = base.ffn_hidden_size / base.hidden_size
    target = params_billion * 1e9
    best = None
    for width in range(512, 16384 + 1, 512):  # 4k heads: splits over TP 1, 2, 4
        heads = width // 128
        groups = math.gcd(heads, 8)
        ffn = int(round(ratio * width / 256)) * 256
        probe = base.replace(
            num_layers=1,
            hidden_size=width,
            ffn_hidden_size=ffn,
            num_attention_heads=heads,
            num_query_groups=groups,
        )
        fixed = probe.replace(num_layers=0).num_parameters()[0]  # embeddings, LM head, norm
        per_layer = probe.num_parameters()[0] - fixed
        layers = max(1, round((target - fixed) / per_layer))
        total = fixed + layers * per_layer
        score = abs(math.log(total / target)) + 0.5 * abs(math.log(width / layers / ASPECT))
        if best is None or score < best[0]:
            best = (score, width, layers, ffn, heads, groups)
    _, width, layers, ffn, heads, groups = best
    return {
        "llm.hidden_size": width,
        "llm.num_layers": layers,
        "llm.ffn_hidden_size": ffn,
        "llm.num_attention_heads": heads,
        "llm.num_query_groups": groups,
        "llm.kv_channels": 128,
    }


def vision_fields(v: VisionConfig) -> dict[str, int]:
    return {
        "vision.hidden_size": v.hidden_size,
        "vision.num_layers": v.num_layers,
        "vision.num_attention_heads": v.num_attention_heads,
        "vision.ffn_hidden_size": v.ffn_hidden_size,
    }


def planned_model(
    flavor: Optional[str] = None,
    llm_size: Optional[float] = None,
    family: str = "qwen3",
    vision_from_law: bool = False,
    law: Optional[ScalingLaw] = None,
) -> tuple[ModelSection, list[str]]:
    """(model section, notes). `flavor` alone: that model. `llm_size` (billions): an LLM of the
    family near that size with the encoder from the law. `vision_from_law` replaces a flavor's
    encoder by the law's. A law that extrapolates says so in the notes."""
    if (flavor is None) == (llm_size is None):
        raise ConfigError("give either --model FLAVOR or --llm-size BILLIONS")
    if flavor is not None:
        get_flavor(flavor)  # a clear error for an unknown name
        section = ModelSection(flavor=flavor)
    else:
        section = ModelSection(flavor=FAMILY_FLAVOR[family])
        section = section.apply_overrides(propose_llm_fields(llm_size, family), parse=False)
        vision_from_law = True
    notes = []
    if vision_from_law:
        size = llm_size_billion(section.resolve())
        v = propose_vision_config(size, law=law)
        section = section.apply_overrides(vision_fields(v), parse=False)
        used = law.source if law is not None else "the paper's points"
        notes.append(
            f"vision encoder from the joint law ({used}): LLM {size:.2f}B -> ViT "
            f"{v.num_parameters() / 1e9:.2f}B"
        )
        current = law or PAPER_LAW
        if current.extrapolates(size):
            lo, hi = current.llm_range
            notes.append(
                f"NOTE: the law was fitted on LLMs of {lo:.3g}-{hi:.3g}B; {size:.2f}B is outside "
                "that range, so the encoder size is an extrapolation"
            )
    return section, notes
