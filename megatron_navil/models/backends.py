"""Backend choice in one place: `local` (pure torch, CPU/CI) or `transformer_engine` (GPU).

A backend answers "which module implements X" for the specs (models/specs.py); nothing else in
the model branches on the backend. The local backend extends Megatron-Core's LocalSpecProvider
with what Megatron lacks for us (a THD/varlen core attention that runs on CPU, no-communication
TP-sharded linears for the modality experts); the TE backend extends TESpecProvider likewise.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from megatron_navil.config.base import ConfigError
from megatron_navil.config.parallel import PrecisionConfig


def te_available() -> bool:
    """Transformer Engine importable and a CUDA device present."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(precision: PrecisionConfig) -> str:
    """'local' or 'transformer_engine' for this machine and config; clear error if impossible."""
    if precision.backend == "auto":
        return "transformer_engine" if te_available() else "local"
    if precision.backend == "transformer_engine" and not te_available():
        raise ConfigError(
            "precision.backend=transformer_engine needs a CUDA GPU and Transformer Engine "
            "(pip install 'megatron-navil[te]'); use backend=local or auto on this machine"
        )
    return precision.backend


@dataclass(frozen=True)
class Backend:
    """Module classes the specs are built from."""

    name: str
    column_parallel_linear: type
    """TP column-parallel linear (comm included)."""
    row_parallel_linear: type
    """TP row-parallel linear (comm included)."""
    shard_linear: type
    """TP-sharded linear WITHOUT communication (the modality experts own their comm)."""
    rms_norm: type
    """RMSNorm with Megatron's (config, hidden_size, eps) constructor."""
    core_attention: type
    """Packed-sequence (THD) core attention: causal or bidirectional by mask type."""
    experts: type
    """Megatron MoE experts module holding the two FFN modality experts."""
    experts_submodules: object
    """Its MLPSubmodules."""
    fp8_row_multiple: int
    """Row-count multiple every modality GEMM is padded to (16 under FP8, else 1)."""


def get_backend(name: str, row_multiple: int = 1) -> Backend:
    if name == "local":
        from megatron.core.models.backends import LocalSpecProvider

        from megatron_navil.models.core_attention import VarlenDotProductAttention
        from megatron_navil.models.local_layers import RMSNorm, ShardLinear

        provider = LocalSpecProvider()
        experts, experts_sub = provider.grouped_mlp_modules(False, False)
        return Backend(
            name=name,
            column_parallel_linear=provider.column_parallel_linear(),
            row_parallel_linear=provider.row_parallel_linear(),
            shard_linear=ShardLinear,
            rms_norm=RMSNorm,
            core_attention=VarlenDotProductAttention,
            experts=experts,
            experts_submodules=experts_sub,
            fp8_row_multiple=row_multiple,
        )
    if name == "transformer_engine":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        from megatron_navil.models.te_layers import TEShardLinear, TEVarlenAttention

        provider = TESpecProvider()
        experts, experts_sub = provider.grouped_mlp_modules(True, False)
        return Backend(
            name=name,
            column_parallel_linear=provider.column_parallel_linear(),
            row_parallel_linear=provider.row_parallel_linear(),
            shard_linear=TEShardLinear,
            rms_norm=provider.layer_norm(rms_norm=True),
            core_attention=TEVarlenAttention,
            experts=experts,
            experts_submodules=experts_sub,
            fp8_row_multiple=row_multiple,
        )
    raise ConfigError(f"unknown backend {name!r}")
