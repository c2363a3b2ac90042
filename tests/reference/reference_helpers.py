"""Shared builders for the reference-model tests (imported as `reference_helpers`).

Seeded tiny models and packed inputs.

Models are built from the debug flavors, initialised with `init_weights_` (std 0.1 so effects
are large, norms/LayerScale/biases perturbed so bugs in them show) and run in float64, so
"unchanged" can be asserted to ~1e-12 and "changed" by a wide margin.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_navil.config import get_flavor
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.reference import NaViLReference, image_token_ids

# float64 noise floor is ~1e-16; these tiny models stay far below 1e-12 for equal computations.
EXACT = dict(rtol=0.0, atol=1e-12)


def make_cfg(flavor: str = "debug-internlm2", overrides: Optional[dict] = None) -> NaViLModelConfig:
    cfg = get_flavor(flavor)
    if overrides:
        cfg = cfg.apply_overrides(overrides)
        cfg.validate()
    return cfg


def make_model(
    flavor: str = "debug-internlm2",
    overrides: Optional[dict] = None,
    seed: int = 0,
    std: float = 0.1,
) -> NaViLReference:
    model = NaViLReference(make_cfg(flavor, overrides))
    model.init_weights_(torch.Generator().manual_seed(seed), std=std)
    return model.double().eval()


def random_pixels(grids: Sequence[tuple[int, int]], seed: int, patch: int = 16) -> torch.Tensor:
    """Patches [sum h*w, 3*P*P] in [-1, 1] for the given patch grids."""
    g = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in grids)
    return torch.rand(n, 3 * patch * patch, generator=g, dtype=torch.float64) * 2 - 1


def text_ids(cfg: NaViLModelConfig, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.llm.first_special_token_id, (n,), generator=g).tolist()


class Sample:
    """One sample: text, one image (all its scales), text. `images` lists one entry per image."""

    def __init__(
        self,
        cfg: NaViLModelConfig,
        images: Sequence[Sequence[tuple[int, int]]],
        seed: int,
        n_text: int = 5,
    ):
        self.ids: list[int] = text_ids(cfg, n_text, seed)
        self.grids: list[tuple[int, int]] = []
        self.pixels: list[torch.Tensor] = []
        for k, scales in enumerate(images):
            self.ids += image_token_ids(cfg, scales) + text_ids(cfg, n_text, seed + 100 + k)
            self.grids += list(scales)
            self.pixels.append(random_pixels(scales, seed + 200 + k))


def pack(samples: Sequence[Sample]) -> dict:
    """Model inputs for the packed sequence of `samples` (positions restart per sample)."""
    ids = [i for s in samples for i in s.ids]
    pos = [p for s in samples for p in range(len(s.ids))]
    cu = [0]
    for s in samples:
        cu.append(cu[-1] + len(s.ids))
    grids = [g for s in samples for g in s.grids]
    out = dict(
        input_ids=torch.tensor(ids),
        position_ids=torch.tensor(pos),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
    )
    if grids:
        out["pixel_values"] = torch.cat([p for s in samples for p in s.pixels])
        out["grid_thw"] = torch.tensor([(1, h, w) for h, w in grids])
    return out
