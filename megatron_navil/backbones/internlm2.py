"""InternLM2, the LLM family of NaViL-2B: fused grouped `wqkv`, no q/k norm, BOS on every encode,
the two experts' attention outputs composed through one projection."""

from megatron_navil.backbones.base import Backbone, LLMNames

_LAYER = "model.layers.*."

BACKBONE = Backbone(
    name="internlm2",
    display_name="InternLM2",
    names=LLMNames(
        embed="model.tok_embeddings.weight",
        head="output.weight",
        final_norm="model.norm.weight",
        attn_norm=_LAYER + "attention_norm.weight",
        ffn_norm=_LAYER + "ffn_norm.weight",
        qkv=(_LAYER + "attention.wqkv{ve}.weight",),
        proj=_LAYER + "attention.wo{ve}.weight",
        gate_up=(_LAYER + "feed_forward{ve}.w1.weight", _LAYER + "feed_forward{ve}.w3.weight"),
        down=_LAYER + "feed_forward{ve}.w2.weight",
    ),
    qkv_layout="fused_grouped",
    hf_model_type="internlm2",
    released_architecture="InternLM2VEForCausalLM",
    released_repo="OpenGVLab/NaViL-2B",
    identified_by="internlm2",
    qk_layernorm=False,
    output_proj_mode="composed",
    template="internlm2-chat",
    chat_style="internlm2",
    add_bos=True,
    hf_config_extras={"bias": False},
    # InternLM2Config's defaults (its remote configuration code) for the keys we read.
    hf_defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "initializer_range": 0.02},
)
