"""Megatron-Core TransformerConfig objects for the LLM and the vision encoder.

Our typed configs (megatron_navil.config) are the user-facing source of truth; these builders
translate them. The vision encoder gets its own TransformerConfig with pipeline size 1: it lives
whole on the first pipeline stage, so Megatron must not split its layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.enums import Fp8Recipe
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_navil.config.base import ConfigError
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.config.parallel import (
    GRAD_ACCUM_FUSION_NEEDS_TE,
    ParallelConfig,
    PrecisionConfig,
)
from megatron_navil.utils import cpu_compat
from megatron_navil.utils.dtypes import torch_dtype


def gradient_accumulation_fusion(precision: PrecisionConfig, backend: str) -> bool:
    """The resolved switch for a model built on `backend`. None (auto) is off here: only the
    trainer, which wraps the model in Megatron DDP (the owner of main_grad), turns it on
    (training/step.ddp_precision)."""
    if precision.gradient_accumulation_fusion and backend != "transformer_engine":
        raise ConfigError(GRAD_ACCUM_FUSION_NEEDS_TE)
    return bool(precision.gradient_accumulation_fusion)


def bias_swiglu_fusion(precision: PrecisionConfig, backend: str) -> bool:
    """The resolved switch: explicit value, else on with TE (the fused kernel is torch.compile'd
    and runs on either backend, but the local backend is the unfused reference)."""
    if precision.bias_swiglu_fusion is None:
        return backend == "transformer_engine"
    return precision.bias_swiglu_fusion


def _common(parallel: ParallelConfig, precision: PrecisionConfig, backend: str) -> dict:
    dtype = torch_dtype(precision.params_dtype)
    te = backend == "transformer_engine"
    cpu = cpu_compat.needed()  # the one condition of CPU-only settings (utils/cpu_compat.py)
    common = dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        use_cpu_initialization=cpu,
        normalization="RMSNorm",
        attention_dropout=precision.attention_dropout,
        hidden_dropout=precision.hidden_dropout,
        # Fusions follow the backend, not the device: they need TE (or apex) kernels, and the
        # local backend (always the one on CPU; on a GPU only without a working TE) runs the
        # unfused torch paths, the exact references.
        bias_dropout_fusion=te,
        apply_rope_fusion=te,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=gradient_accumulation_fusion(precision, backend),
        persist_layer_norm=False,
        calculate_per_token_loss=True,
        recompute_granularity=parallel.recompute_granularity,
        recompute_method=parallel.recompute_method
        if parallel.recompute_granularity == "full"
        else None,
        recompute_num_layers=parallel.recompute_num_layers
        if parallel.recompute_granularity == "full"
        else None,
        transformer_impl="transformer_engine" if te else "local",
        # gloo matches point-to-point messages between two ranks in posting order; Megatron's
        # batched p2p posts send_prev before send_next on every rank, which swaps activations
        # and gradients between a PP=2 pair under the interleaved schedule. The unbatched path
        # orders sends/receives by rank parity. NCCL (GPU) keeps Megatron's default.
        batch_p2p_comm=not cpu,
    )
    if precision.fp8 is not None:
        # Amax reduced over TP only: DP ranks' packs differ, so their FP8 modules need not
        # run in the same order or number (see models/fp8.py).
        common.update(fp8="hybrid", fp8_recipe=Fp8Recipe(precision.fp8), tp_only_amax_red=True)
    return common


def llm_transformer_config(
    cfg: NaViLModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    backend: str,
    grouped_experts: bool = False,
) -> TransformerConfig:
    """`grouped_experts`: the FFN experts run as one TE GroupedLinear (backends.py decides)."""
    llm = cfg.llm
    kw = _common(parallel, precision, backend)
    kw.update(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        ffn_hidden_size=llm.ffn_hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.num_query_groups,
        kv_channels=llm.kv_channels,
        layernorm_epsilon=llm.norm_eps,
        qk_layernorm=llm.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        # SwiGLU of the dense MLP and of both experts (models/moe.py passes probs in the
        # activation dtype, so the weighted kernel keeps no fp32 copy of the intermediate).
        bias_activation_fusion=bias_swiglu_fusion(precision, backend),
        add_bias_linear=False,
        add_qkv_bias=False,
        init_method_std=llm.init_method_std,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        variable_seq_lengths=False,
    )
    if cfg.experts.ffn_experts:
        kw.update(
            num_moe_experts=2,
            moe_ffn_hidden_size=llm.ffn_hidden_size,
            moe_router_topk=1,
            moe_aux_loss_coeff=0.0,
            moe_router_load_balancing_type="none",
            moe_token_dispatcher_type=parallel.moe_token_dispatcher_type,
            moe_grouped_gemm=grouped_experts,
            moe_permute_fusion=False,
            moe_router_dtype="fp32",
            # Megatron requires it for top-1; our router has no softmax
            moe_router_pre_softmax=True,
        )
    return TransformerConfig(**kw)


def vision_transformer_config(
    cfg: NaViLModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, backend: str
) -> TransformerConfig:
    v = cfg.vision
    kw = _common(parallel, precision, backend)
    kw.update(
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.num_attention_heads,
        num_query_groups=v.num_attention_heads,
        kv_channels=v.head_dim,
        layernorm_epsilon=v.norm_eps,
        # Handled by our TPRMSNorm ("q_norm"/"k_norm"); Megatron's flag would also make its
        # grad finalisation all-reduce parameters named like q_layernorm.
        qk_layernorm=False,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact (erf) GELU, as the released encoder
        # NOTE: never fused: Megatron's fused bias-GELU is the tanh approximation.
        bias_activation_fusion=False,
        add_bias_linear=True,
        add_qkv_bias=v.qkv_bias,
        init_method_std=v.init_method_std,
        pipeline_model_parallel_size=1,
    )
    return TransformerConfig(**kw)
