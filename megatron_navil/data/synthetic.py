"""Synthetic packed micro-batches (random patches, token layouts that follow NaViL's rules).

Used by the demo, the parity tests and the benchmarks: every field obeys the batch contract of
megatron_navil/batch.py, so the model runs its real code paths (several samples per pack,
several images and sizes per sample, text-only samples, padding sample at the end).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

from megatron_navil.batch import NaViLBatch
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.data.layout import image_token_ids

if TYPE_CHECKING:
    from megatron_navil.data.planner import GlobalCosts


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


def synthetic_corpus_costs(
    cfg: NaViLModelConfig,
    num_image_samples: int,
    visual_share: float,
    seed: int = 0,
    multiscale: bool = False,
) -> "GlobalCosts":
    """Planner costs of a synthetic web-like corpus, for measuring dealing and packing at a
    real model shape without images or shards (benchmarks/bench_dp_balance.py, the DP balance
    tests). Sizes go through the real ImageSizer (NaViL's resize rules for `cfg`).

    Image-bearing samples, 60% captions (one image, 10-80 text tokens), 25% conversations (one
    image, 40-600 tokens), 15% interleaved (2-6 images, 100-1500 tokens); image areas
    log-normal around 0.35 MP (0.03-4 MP), aspect ratios log-normal (sigma 0.35, within 1:4).
    Text-only samples (log-normal around 600 tokens, 20-8000) are added until visual tokens
    make up `visual_share` of all tokens, then the samples are shuffled."""
    import numpy as np

    from megatron_navil.data.planner import GlobalCosts
    from megatron_navil.data.sizing import ImageSizer

    if not 0 < visual_share < 1:
        raise ValueError(f"visual_share must be in (0, 1), got {visual_share}")
    rng = np.random.default_rng(seed)
    sizer = ImageSizer(cfg, multiscale)
    kind = rng.choice(3, size=num_image_samples, p=[0.6, 0.25, 0.15])
    n_img = np.where(kind == 2, rng.integers(2, 7, num_image_samples), 1)
    text_lo = np.array([10, 40, 100])[kind]
    text_hi = np.array([80, 600, 1500])[kind]
    text = rng.integers(text_lo, text_hi + 1)
    rows = []
    for count, t in zip(n_img.tolist(), text.tolist()):
        area = np.clip(rng.lognormal(np.log(0.35e6), 0.8, count), 0.03e6, 4e6)
        aspect = np.clip(rng.lognormal(0.0, 0.35, count), 0.25, 4.0)
        h = np.maximum(np.sqrt(area / aspect).astype(np.int64), 1)
        w = np.maximum((area / h).astype(np.int64), 1)
        tokens = [sizer.tokens(a, b) for a, b in zip(h.tolist(), w.tolist())]
        vis = np.array([sizer.vision(a, b) for a, b in zip(h.tolist(), w.tolist())], np.float64)
        rows.append((t + 2 + sum(tokens), count, max(tokens), *vis.sum(axis=0), sum(tokens)))
    arr = np.array(rows, dtype=np.float64)
    visual = arr[:, 3].sum()
    need = visual * (1 - visual_share) / visual_share - (arr[:, 0].sum() - visual)
    texts = []
    while need > 0:
        t = int(np.clip(rng.lognormal(np.log(600), 1.0), 20, 8000))
        texts.append((t + 2, 0, 0, 0, 0, 0, 0))
        need -= t + 2
    if texts:
        arr = np.concatenate([arr, np.array(texts, dtype=np.float64)])
    arr = arr[rng.permutation(len(arr))]
    return GlobalCosts(
        arr[:, 0].astype(np.int64),
        arr[:, 1].astype(np.int64),
        arr[:, 2].astype(np.int64),
        None,
        arr[:, 3].astype(np.int64),
        arr[:, 4].astype(np.int64),
        arr[:, 5],
        arr[:, 6].astype(np.int64),
    )
