"""Layer specs: which module fills each slot, for the vision encoder and the LLM.

Backend choice enters only through `Backend` (models/backends.py); the spec trees below are the
same for the local and the Transformer Engine backends.

The slots a modality expert can fill (linear_qkv, linear_proj, q/k layernorm, mlp) follow the
routing protocol of models/routed.py: whatever class a spec names there is called with
`routing=`, and plain Megatron/TE modules ignore it, so both branches below (experts on or off)
and both backends go through the same attention and layer code.
"""

from __future__ import annotations

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.models.attention import NaViLAttentionSubmodules, NaViLSelfAttention
from megatron_navil.models.backends import Backend
from megatron_navil.models.layer import LayerScale, NaViLLayerSubmodules, NaViLTransformerLayer
from megatron_navil.models.local_layers import TPRMSNorm
from megatron_navil.models.modality import (
    ModalityColumnParallelLinear,
    ModalityNorm,
    ModalityRowParallelLinear,
)
from megatron_navil.models.moe import ModalityMoELayer, ModalityRouter


def _dense_mlp(backend: Backend) -> ModuleSpec:
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=backend.column_parallel_linear, linear_fc2=backend.row_parallel_linear
        ),
    )


def vision_layer_spec(cfg: NaViLModelConfig, backend: Backend) -> ModuleSpec:
    """Pre-norm ViT layer: RMSNorm, bidirectional packed attention with 2D RoPE and optional
    full-width q/k RMSNorm, LayerScale on both branches, GELU MLP with biases."""
    v = cfg.vision
    qk_norm = TPRMSNorm if v.qk_normalization else None
    layerscale = ModuleSpec(module=LayerScale, params={"init_value": v.layerscale_init})
    full = tuple(v.fullatt_block_indexes) if v.window_size else None
    return ModuleSpec(
        module=NaViLTransformerLayer,
        params={"full_attention_layers": full},
        submodules=NaViLLayerSubmodules(
            input_layernorm=backend.rms_norm,
            self_attention=ModuleSpec(
                module=NaViLSelfAttention,
                params={
                    "attn_mask_type": AttnMaskType.no_mask,
                    "qkv_bias": v.qkv_bias,
                    "full_width_qk_norm": True,
                },
                submodules=NaViLAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear,
                    core_attention=backend.core_attention,
                    linear_proj=backend.row_parallel_linear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            attn_layerscale=layerscale,
            pre_mlp_layernorm=backend.rms_norm,
            mlp=_dense_mlp(backend),
            mlp_layerscale=layerscale,
        ),
    )


def llm_layer_spec(cfg: NaViLModelConfig, backend: Backend) -> ModuleSpec:
    """Decoder layer with MHA-MMoE (per-modality QKV / output projection / q,k norms) and
    FFN-MMoE (per-modality SwiGLU experts behind the modality router). Shared norms."""
    experts = cfg.experts
    if experts.attention_experts:
        qkv = ModuleSpec(
            module=ModalityColumnParallelLinear, params={"shard_linear": backend.shard_linear}
        )
        proj = ModuleSpec(
            module=ModalityRowParallelLinear,
            params={
                "shard_linear": backend.shard_linear,
                "composed": experts.output_proj_mode == "composed",
            },
        )
        qk_norm = ModuleSpec(module=ModalityNorm, params={"norm_cls": backend.rms_norm})
    else:
        qkv, proj, qk_norm = (
            backend.column_parallel_linear,
            backend.row_parallel_linear,
            backend.rms_norm,
        )
    if experts.ffn_experts:
        mlp = ModuleSpec(
            module=ModalityMoELayer,
            params={"row_multiple": backend.fp8_row_multiple},
            submodules=MoESubmodules(
                experts=ModuleSpec(module=backend.experts, submodules=backend.experts_submodules),
                router=ModalityRouter,
            ),
        )
    else:
        mlp = _dense_mlp(backend)
    return ModuleSpec(
        module=NaViLTransformerLayer,
        submodules=NaViLLayerSubmodules(
            input_layernorm=backend.rms_norm,
            self_attention=ModuleSpec(
                module=NaViLSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=NaViLAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=backend.core_attention,
                    linear_proj=proj,
                    q_layernorm=qk_norm if cfg.llm.qk_layernorm else None,
                    k_layernorm=qk_norm if cfg.llm.qk_layernorm else None,
                ),
            ),
            pre_mlp_layernorm=backend.rms_norm,
            mlp=mlp,
        ),
    )


def block_submodules(
    layer_spec: ModuleSpec, num_layers: int, final_norm
) -> TransformerBlockSubmodules:
    """A block of `num_layers` identical layers (this pipeline stage's share)."""
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=final_norm)
