"""Qwen3, the LLM family of NaViL-9B: separate q/k/v projections, per-head q/k RMSNorm, an
explicit `head_dim`, no BOS, each expert with its own attention output projection."""

from megatron_navil.backbones.base import Backbone, LLMNames

_LAYER = "model.layers.*."

BACKBONE = Backbone(
    name="qwen3",
    display_name="Qwen3",
    names=LLMNames(
        embed="model.embed_tokens.weight",
        head="lm_head.weight",
        final_norm="model.norm.weight",
        attn_norm=_LAYER + "input_layernorm.weight",
        ffn_norm=_LAYER + "post_attention_layernorm.weight",
        qkv=tuple(_LAYER + f"self_attn.{x}_proj{{ve}}.weight" for x in "qkv"),
        proj=_LAYER + "self_attn.o_proj{ve}.weight",
        gate_up=(_LAYER + "mlp{ve}.gate_proj.weight", _LAYER + "mlp{ve}.up_proj.weight"),
        down=_LAYER + "mlp{ve}.down_proj.weight",
        q_norm=_LAYER + "self_attn.q_norm{ve}.weight",
        k_norm=_LAYER + "self_attn.k_norm{ve}.weight",
    ),
    qkv_layout="separate",
    hf_model_type="qwen3",
    released_architecture="Qwen3VEForCausalLM",
    released_repo="OpenGVLab/NaViL-9B",
    identified_by="qwen3",
    qk_layernorm=True,
    output_proj_mode="separate",
    template="qwen3-chat",
    chat_style="qwen3",
    add_bos=False,
    hf_config_extras={"attention_bias": False},
    head_dim_key="head_dim",
    # transformers' Qwen3Config defaults (4.51) for the keys we read.
    hf_defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "initializer_range": 0.02},
)
