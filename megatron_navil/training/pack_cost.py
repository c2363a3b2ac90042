"""The cost of a planned pack for balanced DP dealing: its model FLOPs before it is built.

The loader deals each step's packs so that the data-parallel ranks' FLOPs are about equal
(data/dealing.py). It plans from the index alone, so the count is flops.count_flops (the MFU
convention: forward and backward of the parts the stage trains, padding excluded) on sizes taken
from the planned pack's composition: its tokens, the causal pairs of each sample, the visual
tokens, the vision encoder's patches and per-image attention pairs (window layers estimated by
flops.window_pairs_estimate), and the LM-head rows. The one estimate: those rows are every token
except images' and each sample's last (a conversation's user turns, which get no loss either,
are not in the index); tests/data/test_dp_balance.py checks the rest is exact against the built
batch's count.
"""

from __future__ import annotations

from typing import Callable

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.data.planner import PlannedPack
from megatron_navil.training.flops import (
    ALL_PARTS,
    BatchCounts,
    count_flops,
    window_pairs_estimate,
)


def planned_counts(cfg: NaViLModelConfig, pack: PlannedPack, seq_length: int) -> BatchCounts:
    """The sizes flops.count_flops needs, from a planned pack."""
    return BatchCounts(
        tokens=float(pack.tokens),
        visual=float(pack.visual_tokens),
        causal_pairs=pack.causal_pairs(seq_length),
        # loss rows: every token but images' (they get no loss) and each sample's last
        counted=float(max(0, pack.tokens - pack.image_tokens - len(pack.samples))),
        special=pack.image_tokens > 0,  # <img>, </img>, line breaks: trained special embeddings
        patches=float(pack.patches),
        full_pairs=float(pack.square_patches),
        window_pairs=window_pairs_estimate(cfg, pack.patches, pack.square_patches),
    )


_SIZES = ("tokens", "visual", "causal_pairs", "counted", "patches", "full_pairs", "window_pairs")


def planned_pack_flops(
    cfg: NaViLModelConfig, seq_length: int, trained: frozenset = ALL_PARTS
) -> Callable[[PlannedPack], float]:
    """Forward + backward model FLOPs of a planned pack when `trained` parts train (a function
    for the loader).

    count_flops walks every layer's GEMMs (about 0.5 ms at the 2B shape), too slow for the
    loader thread at thousands of packs per step. For a given pattern of which gradients flow
    (special tokens, visual tokens, images present or not) the count is linear in the sizes,
    so it is taken once per pattern at a base point and at one unit step of each size, and a
    pack costs a dot product (equal to count_flops to 1e-9 relative:
    tests/data/test_dp_balance.py)."""
    linear: dict[tuple[bool, bool, bool], tuple[float, list[float], list[float]]] = {}
    # sizes that are 0 in a pattern stay 0 (a zero count can stop gradients from flowing)
    zero_without = {"visual": 1, "patches": 2, "full_pairs": 2, "window_pairs": 2}

    def model(special: bool, visual: bool, images: bool):
        v = 1.0 if images else 0.0
        base = dict(
            tokens=4096.0,
            visual=1024.0 if visual else 0.0,
            causal_pairs=1e6,
            counted=2048.0,
            patches=4096.0 * v,
            full_pairs=4e6 * v,
            window_pairs=1e6 * v,
        )
        at = count_flops(cfg, BatchCounts(special=special, **base), trained).total
        slopes = []
        for name in _SIZES:
            if name in zero_without and not (special, visual, images)[zero_without[name]]:
                slopes.append(0.0)
                continue
            moved = dict(base, **{name: base[name] + 1.0})
            step = count_flops(cfg, BatchCounts(special=special, **moved), trained).total
            slopes.append(step - at)
        return at, [base[n] for n in _SIZES], slopes

    def cost(pack: PlannedPack) -> float:
        c = planned_counts(cfg, pack, seq_length)
        key = (c.special, c.visual > 0, c.patches > 0)
        if key not in linear:
            linear[key] = model(*key)
        at, base, slopes = linear[key]
        return at + sum(k * (getattr(c, n) - b) for n, b, k in zip(_SIZES, base, slopes))

    return cost
