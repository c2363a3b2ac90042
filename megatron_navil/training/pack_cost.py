"""The cost of a planned pack for balanced DP dealing: its model FLOPs before it is built.

The loader deals each step's packs so that the data-parallel ranks' FLOPs are about equal
(data/dealing.py). It plans from the index alone, so the FLOPs come from the planned pack's
composition with the same formulas the trainer reports MFU with (flops.py): the LLM on the
pack's tokens (padding excluded: the builder pads after planning), its causal attention within
each sample, the visual experts' extra projection on the visual tokens, the vision encoder on the
images' patches with bidirectional attention per image and scale, and the LM head. The one
estimate: the LM head's rows are every token except images' and each sample's last (a
conversation's user turns, which get no loss either, are not in the index);
tests/data/test_dp_balance.py bounds the difference to the built batch's count.
"""

from __future__ import annotations

from typing import Callable

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.data.planner import PlannedPack
from megatron_navil.training.flops import llm_flops, vision_flops


def planned_pack_flops(
    cfg: NaViLModelConfig, seq_length: int
) -> Callable[[PlannedPack], float]:
    """Forward + backward model FLOPs of a planned pack (a function for the loader)."""

    def cost(pack: PlannedPack) -> float:
        # loss rows: every token but images' (they get no loss) and each sample's last
        counted = max(0, pack.tokens - pack.image_tokens - len(pack.samples))
        flops = llm_flops(
            cfg, pack.tokens, pack.visual_tokens, pack.causal_pairs(seq_length), counted
        )
        if pack.patches:
            flops += vision_flops(cfg, pack.patches, pack.square_patches)
        return 3.0 * flops

    return cost
