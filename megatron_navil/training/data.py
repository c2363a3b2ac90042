"""Data for the trainer: the shard loaders (megatron_navil.data.loader) or mock packs.

Every data-parallel rank yields the same number of packs per step (expert parallelism
deadlocks otherwise); every pipeline stage of a DP rank reads the same stream.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Optional

import torch

from megatron_navil.batch import NaViLBatch, padding_segments
from megatron_navil.config.base import ConfigError
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.data.synthetic import synthetic_batch
from megatron_navil.pack_meta import PackMeta

MOCK_LAYOUTS = (
    [[24, [(8, 8)], 40], [60], [10, [(4, 6), (8, 12)], 30]],
    [[12, [(16, 8)], 50], [30, [(6, 6)], 20]],
    [[80], [40, 20]],
)


class MockPackLoader:
    """Deterministic synthetic packs: pack i of DP rank r is a function of (seed, i, r) only,
    so resuming is exact by construction. Layouts scale with seq_length (images of 64-128
    patches in 2-3 samples per pack)."""

    def __init__(
        self,
        cfg: NaViLModelConfig,
        seq_length: int,
        seed: int,
        dp_rank: int,
        dp_size: int,
        pack_metadata: bool = False,
    ):
        self.cfg, self.seq_length, self.seed = cfg, seq_length, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.pack_metadata = pack_metadata  # data.host_pack_metadata, as the shard loader
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> NaViLBatch:
        i = self.position * self.dp_size + self.dp_rank
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        layout = MOCK_LAYOUTS[i % len(MOCK_LAYOUTS)]
        scale = max(1, self.seq_length // 256)
        samples = [[p * scale if isinstance(p, int) else p for p in s] for s in layout]
        while sum(_tokens(self.cfg, s) for s in samples) > self.seq_length and len(samples) > 1:
            samples.pop()
        self.position += 1
        # Text drawn from 64 ids: a distribution the model can learn (the loss drops).
        batch = synthetic_batch(self.cfg, self.seq_length, g, samples, text_vocab=64)
        if self.pack_metadata:
            batch.pack_meta = PackMeta.build(self.cfg, batch)
        return batch

    def state_dict(self) -> dict:
        # Global packs consumed, so a run resumed at another DP size continues the same stream.
        return {"position": self.position, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["position"]) * int(state.get("dp_size", self.dp_size))
        if consumed % self.dp_size:
            raise ValueError(
                f"mock data: {consumed} packs consumed do not divide over {self.dp_size} "
                "data-parallel ranks"
            )
        self.position = consumed // self.dp_size

    @property
    def counters(self) -> dict:
        return {"batches": self.position}

    def close(self) -> None:
        pass


def _tokens(cfg: NaViLModelConfig, parts) -> int:
    from megatron_navil.data.layout import image_token_ids

    return sum(p if isinstance(p, int) else len(image_token_ids(cfg, p)) for p in parts)


def concat_packs(packs: list[NaViLBatch], cfg: Optional[NaViLModelConfig] = None) -> NaViLBatch:
    """Several packs -> one longer THD sequence (micro_batch_size > 1). When every pack came
    with host metadata and `cfg` is given, the joined pack gets its own (built on the CPU)."""
    if len(packs) == 1:
        return packs[0]
    offsets = torch.tensor([0] + [p.num_tokens for p in packs[:-1]]).cumsum(0)
    cu = torch.cat(
        [packs[0].cu_seqlens] + [p.cu_seqlens[1:] + int(o) for p, o in zip(packs[1:], offsets[1:])]
    )
    images = [p for p in packs if p.pixel_values is not None]
    segment_offsets = [0] + list(itertools.accumulate(len(p.cu_seqlens) - 1 for p in packs))
    cat = lambda name: torch.cat([getattr(p, name) for p in packs])  # noqa: E731
    meta = {
        "samples": sum(int(p.metadata.get("samples", 0)) for p in packs),
        "skipped_images": sum(int(p.metadata.get("skipped_images", 0)) for p in packs),
        # the last pack's padding is the final sample of the concatenation (trim_padding)
        "padding_tokens": int(packs[-1].metadata.get("padding_tokens", 0)),
        # each pack's padding segment, renumbered: the FLOP count leaves padding out
        "padding_segments": [
            i + first for p, first in zip(packs, segment_offsets) for i in padding_segments(p)
        ],
    }
    joined = NaViLBatch(
        tokens=cat("tokens"),
        labels=cat("labels"),
        loss_mask=cat("loss_mask"),
        position_ids=cat("position_ids"),
        cu_seqlens=cu.to(torch.int32),
        pixel_values=torch.cat([p.pixel_values for p in images]) if images else None,
        grid_thw=torch.cat([p.grid_thw for p in images]) if images else None,
        modality_mask=None,
        metadata=meta,
    )
    if cfg is not None and all(p.pack_meta is not None for p in packs):
        joined.pack_meta = PackMeta.build(cfg, joined)
    return joined


def build_loaders(
    cfg, model_cfg: NaViLModelConfig, dp_rank: int, dp_size: int, packs_per_step: int
) -> tuple[object, Optional[Callable[[], Iterable]]]:
    """(train loader, `valid()` returning an iterator over the SAME validation batches at every
    call, or None without validation data)."""
    t = cfg.training
    if cfg.mock_data:

        def mock(seed: int) -> MockPackLoader:
            meta = cfg.data.host_pack_metadata
            return MockPackLoader(model_cfg, t.seq_length, seed, dp_rank, dp_size, meta)

        return mock(t.seed), lambda: mock(t.seed + 1)
    from megatron_navil.data.loader import build_train_loader, build_valid_loader
    from megatron_navil.data.tokenizer import NaViLTokenizer, TokenizerError
    from megatron_navil.training.flops import trained_parts
    from megatron_navil.training.pack_cost import planned_pack_flops

    try:
        tokenizer = NaViLTokenizer.load(cfg.tokenizer)
    except (TokenizerError, OSError) as e:
        raise ConfigError(f"--tokenizer-model {cfg.tokenizer}: {e}") from None
    # The job's one sequence length and seed (training.*); the model config brings the patch
    # limits.
    geometry = dict(seq_length=t.seq_length, seed=t.seed)
    train = build_train_loader(
        cfg.data,
        model_cfg,
        tokenizer,
        dp_rank=dp_rank,
        dp_size=dp_size,
        micro_batches_per_step=packs_per_step,
        pack_cost=planned_pack_flops(model_cfg, t.seq_length, trained_parts(cfg.stage)),
        **geometry,
    )
    if not cfg.data.valid_paths:
        return train, None
    valid = build_valid_loader(
        cfg.data, model_cfg, tokenizer, dp_rank=dp_rank, dp_size=dp_size, **geometry
    )
    return train, lambda: iter(valid)
