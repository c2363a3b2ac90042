"""Synthetic packed micro-batches (random patches, token layouts that follow NaViL's rules).

Used by the demo, the parity tests and the benchmarks: every field obeys the batch contract of
megatron_navil/batch.py, so the model runs its real code paths (several samples per pack,
several images and sizes per sample, text-only samples, padding sample at the end).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_navil.batch import NaViLBatch
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.data.layout import image_token_ids


def synthetic_batch(
    cfg: NaViLModelConfig,
    seq_length: int,
    generator: torch.Generator,
    samples: Optional[Sequence[Sequence[object]]] = None,
    text_vocab: Optional[int] = None,
) -> NaViLBatch:
    """One pack of `seq_length` tokens.

    `samples`: a list of samples, each a list of parts: an int n (n random text tokens) or a
    list of (h, w) patch grids (one image, its scales smallest first). Default: an image sample
    with two scales, a text-only sample, and a two-image sample.
    """
    if samples is None:
        samples = [[3, [(2, 4), (4, 6)], 5], [7], [2, [(2, 2)], 2, [(4, 2)], 3]]
    # ordinary tokens lie below the special ones
    text_vocab = min(text_vocab or cfg.llm.first_special_token_id, cfg.llm.first_special_token_id)
    tokens, weights, positions, seqlens, grids = [], [], [], [], []
    for parts in samples:
        ids, w = [], []
        for part in parts:
            if isinstance(part, int):
                ids += torch.randint(0, text_vocab, (part,), generator=generator).tolist()
                w += [1.0] * part
            else:
                img = image_token_ids(cfg, part)
                ids += img
                w += [0.0] * len(img)
                grids += [(1, h, w_) for h, w_ in part]
        tokens += ids
        weights += w
        positions += list(range(len(ids)))
        seqlens.append(len(ids))
    if len(tokens) > seq_length:
        raise ValueError(f"synthetic samples need {len(tokens)} tokens > seq_length {seq_length}")
    pad = seq_length - len(tokens)
    if pad:  # a padding "sample" with no loss keeps T fixed (pipeline shapes)
        tokens += [0] * pad
        weights += [0.0] * pad
        positions += list(range(pad))
        seqlens.append(pad)
    t = torch.tensor(tokens)
    # labels[t] = next token inside a sample; the last token of a sample predicts nothing.
    labels = torch.roll(t, -1)
    loss_mask = torch.tensor(weights)
    ends = torch.tensor(seqlens).cumsum(0) - 1
    loss_mask[ends] = 0.0
    n_patch = cfg.vision.num_channels * cfg.vision.patch_size**2
    grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
    n_patches = int(grid_thw.prod(dim=1).sum()) if grids else 0
    pixel_values = torch.rand(n_patches, n_patch, generator=generator) * 2 - 1 if grids else None
    return NaViLBatch(
        tokens=t,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=torch.tensor(positions),
        cu_seqlens=torch.tensor([0] + seqlens).cumsum(0).to(torch.int32),
        pixel_values=pixel_values,
        grid_thw=grid_thw if grids else None,
        metadata={"samples": len(samples), "tokens": len(tokens) - pad, "padding_tokens": pad},
    )
