"""In-process helpers for the training tests (need the 1-process Megatron state fixture)."""

from __future__ import annotations

import torch

from megatron_navil.config import ParallelConfig, PrecisionConfig
from megatron_navil.models.navil import NaViLModel


def canonical_model(cfg) -> NaViLModel:
    return NaViLModel(cfg, ParallelConfig(), PrecisionConfig())


def read_checkpoint_weights(root: str) -> dict[str, torch.Tensor]:
    """Model weights of a checkpoint (any layout) in the canonical TP=1 layout."""
    from megatron_navil import checkpoint as ckpt
    from megatron_navil.config.model import NaViLModelConfig

    meta = ckpt.read_metadata(root)
    cfg = NaViLModelConfig.from_dict(meta["model"])
    model = canonical_model(cfg)
    ckpt.load_model(root, [model], cfg)
    return {
        k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
    }
