"""What one LLM family is, as data: everything that differs between InternLM2 and Qwen3.

A `Backbone` is the single place that knows a family's HF parameter names, how its q/k/v are
stored, the family-specific keys of its `config.json` (both ways), the defaults a NaViL model of
that family has (output projection, per-head q/k norm, chat template, BOS), and the architecture
names the release uses. Conversion, the flavors, the tokenizer export and the release check read
it; none of them branches on the family's name. The plain-PyTorch reference model
(megatron_navil/reference) keeps its own independent layouts on purpose: it is the test oracle
of these facts.

This module sits just above `errors`: pure facts, no torch, no imports of the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

QKVLayout = Literal["fused_grouped", "separate"]
"""How the HF checkpoint stores an attention block's q/k/v projections:
`fused_grouped`: one matrix whose rows are already Megatron's grouped layout (per KV group: its
query heads, then k, then v), as InternLM2's `wqkv`; `separate`: three matrices q, k, v, as
Qwen3's `q_proj`/`k_proj`/`v_proj` (conversion/transforms.GroupedQKV interleaves them)."""


VISUAL_SUFFIX = "_ve"
"""What the release appends to a text weight's name to name its visual expert."""


def expert_name(name: str, visual: bool) -> str:
    """An LLMNames entry (`{ve}` placeholder) for the text or the visual expert."""
    return name.replace("{ve}", VISUAL_SUFFIX if visual else "")


@dataclass(frozen=True)
class LLMNames:
    """HF parameter names of one family, relative to the LLM's root (`model.layers.*.` ...).

    A plain LLM checkpoint uses them as they are; the NaViL release prefixes them with
    `language_model.`. `*` stands for the layer index and `{ve}` for the visual expert's `_ve`
    suffix (empty for the text weights)."""

    embed: str
    """Token embedding table."""
    head: str
    """Output projection (LM head)."""
    final_norm: str
    """RMSNorm after the last decoder layer."""
    attn_norm: str
    """RMSNorm before attention."""
    ffn_norm: str
    """RMSNorm before the FFN."""
    qkv: tuple[str, ...]
    """q/k/v projection(s): one name for `fused_grouped`, three (q, k, v) for `separate`."""
    proj: str
    """Attention output projection."""
    gate_up: tuple[str, str]
    """SwiGLU gate and up projections, in that order."""
    down: str
    """SwiGLU down projection."""
    q_norm: Optional[str] = None
    """Per-head q RMSNorm, where the family has one."""
    k_norm: Optional[str] = None
    """Per-head k RMSNorm, where the family has one."""


@dataclass(frozen=True)
class Backbone:
    """One LLM family (see the module docstring)."""

    name: str
    """Our name of the family, the value of `llm.backbone` in model configs."""
    display_name: str
    """How messages name it (InternLM2, Qwen3)."""
    names: LLMNames
    """Its HF parameter names."""
    qkv_layout: QKVLayout
    """How its checkpoints store q/k/v."""
    hf_model_type: str
    """`model_type` of its HF config (the released llm_config and a plain LLM alike)."""
    released_architecture: str
    """`llm_config.architectures[0]` in the NaViL release (the modality-expert variant)."""
    released_repo: str
    """Hub repository whose remote code loads a NaViL export of this family."""
    identified_by: str
    """Lower-case text that, found in a config.json's architectures or model_type, says the
    checkpoint is of this family."""
    qk_layernorm: bool
    """Whether its attention has per-head q/k RMSNorm."""
    output_proj_mode: Literal["composed", "separate"]
    """How the release combines the two modality experts' attention output projections."""
    template: str
    """The NaViL conversation template of the family (config.json `template`)."""
    chat_style: str
    """Chat-template style of the tokenizer export (megatron_navil.data.chat_template)."""
    add_bos: bool
    """Whether its tokenizer prepends BOS to every encode (InternLM2's does)."""
    hf_defaults: dict[str, float]
    """What transformers' config class of the family uses when config.json leaves out
    `rope_theta`, `rms_norm_eps` or `initializer_range`, so a converted model runs what
    transformers would run from the same file."""
    hf_config_extras: dict[str, Any] = field(default_factory=dict)
    """Constant llm_config keys the family's HF config carries (e.g. InternLM2's `bias`)."""
    head_dim_key: Optional[str] = None
    """The llm_config key holding the head dimension, when the family writes one (else it is
    hidden_size / num_attention_heads)."""

    def hf_value(self, hf_llm_config: dict, key: str) -> Any:
        """`hf_llm_config[key]`, or the family's transformers default when absent or null."""
        value = hf_llm_config.get(key)
        return self.hf_defaults[key] if value is None else value

    def matches(self, hf_llm_config: dict) -> bool:
        """Whether an HF LLM config (plain or NaViL's llm_config) is of this family."""
        text = " ".join(hf_llm_config.get("architectures") or [])
        return self.identified_by in f"{text} {hf_llm_config.get('model_type', '')}".lower()
