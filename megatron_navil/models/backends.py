"""Backend choice in one place: `local` (pure torch, CPU/CI) or `transformer_engine` (GPU).

A backend answers "which module implements X" for the specs (models/specs.py); nothing else in
the model branches on the backend. The local backend extends Megatron-Core's LocalSpecProvider
with what Megatron lacks for us (a THD/varlen core attention that runs on CPU, no-communication
TP-sharded linears for the modality experts); the TE backend extends TESpecProvider likewise.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_navil.config.base import ConfigError
from megatron_navil.config.parallel import PrecisionConfig
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)

TE_INSTALL_HINT = (
    "pip install --no-build-isolation 'megatron-navil[te]' (Transformer Engine >=2.9,<2.12; it "
    "compiles transformer_engine_torch against this torch, so nvcc must be on PATH), or use an "
    "NGC PyTorch container"
)


@functools.lru_cache(maxsize=1)
def te_import_error() -> Optional[str]:
    """None when `import transformer_engine.pytorch` works, else why not (one line).

    Finding the package is not enough: a TE built for another torch/CUDA, or missing CUDA
    libraries, only fail when the extension loads."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # ImportError, OSError (a missing .so), RuntimeError (ABI checks)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}"[:300]
    return None


def te_available() -> bool:
    """Transformer Engine imports and a CUDA device is present."""
    return torch.cuda.is_available() and te_import_error() is None


def choose_backend(
    requested: str, cuda: bool, te_error: Optional[str]
) -> tuple[str, Optional[str]]:
    """(backend, warning or None) for `precision.backend` = `requested` on a machine with/without
    CUDA and with Transformer Engine importing (te_error None) or not (why)."""
    if requested == "auto":
        if cuda and te_error is None:
            return "transformer_engine", None
        if cuda:
            return "local", (
                f"a CUDA GPU is present but Transformer Engine does not import ({te_error}): "
                f"training uses the slow local backend. Install it: {TE_INSTALL_HINT}; or set "
                "precision.backend=local to keep the local backend without this warning"
            )
        return "local", None
    if requested == "transformer_engine" and not (cuda and te_error is None):
        why = (
            "no CUDA GPU is visible"
            if not cuda
            else f"Transformer Engine does not import ({te_error})"
        )
        raise ConfigError(
            f"precision.backend=transformer_engine needs a CUDA GPU and Transformer Engine, but "
            f"{why}. Install it: {TE_INSTALL_HINT}; or use precision.backend=local or auto"
        )
    if requested not in ("local", "transformer_engine"):
        raise ConfigError(f"unknown precision.backend {requested!r}")
    return requested, None


_WARNED: set[str] = set()


def resolve_backend(precision: PrecisionConfig) -> str:
    """'local' or 'transformer_engine' for this machine and config; clear error if impossible.
    A GPU left on the local backend because TE is broken is said once per process."""
    cuda = torch.cuda.is_available()
    name, warning = choose_backend(precision.backend, cuda, te_import_error() if cuda else None)
    if warning and warning not in _WARNED:
        _WARNED.add(warning)
        log.warning(warning)
    return name


def use_grouped_experts(backend_name: str, experts_trainable: tuple[bool, bool]) -> bool:
    """Run the (text, visual) FFN experts as one TE GroupedLinear?

    TE's GroupedLinear decides whether to compute weight gradients for ALL of its GEMMs from the
    first weight's requires_grad (grouped_linear.py: `weights[0].requires_grad`): with the text
    expert frozen and the visual one trained (stage 1) the visual expert would get no gradient,
    and Megatron DDP with overlap_grad_reduce would wait forever for it. When the two experts
    train differently they run as Megatron's SequentialMLP of TE linears (one GEMM pair each,
    same checkpoint keys); otherwise grouped. The local backend is always sequential.
    """
    return backend_name == "transformer_engine" and experts_trainable[0] == experts_trainable[1]


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
    """Row-count multiple every modality GEMM is padded to (the FP8 recipe's, else 1)."""


def get_backend(name: str, row_multiple: int = 1, grouped_experts: bool = True) -> Backend:
    """The backend's module classes; `grouped_experts` (TE only, see use_grouped_experts) picks
    TEGroupedMLP over a SequentialMLP of TE linears for the FFN experts."""
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
        experts, experts_sub = provider.grouped_mlp_modules(grouped_experts, False)
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
