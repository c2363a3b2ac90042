"""Model FLOPs of one packed micro-batch, for TFLOP/s and MFU, and the convention they follow.

Convention ("model FLOPs", the one `tflops_per_gpu` and `mfu` report; docs/training.md):
- Counted: matmul FLOPs, 2 per multiply-add, of the work the loss needs: per LLM layer QKV,
  attention (QK^T and AV), output projection (+ the second, visual projection in the composed
  mode), SwiGLU (3 GEMMs); the LM head on the rows that take loss; per ViT layer qkv, attention,
  proj, GELU MLP, plus the patch embedding and the connector. Each token uses ONE modality
  expert. Norms, softmax, activations, RoPE and embedding lookups are not counted.
- Padding is not model work: the padding segment of each pack (and the ViT's alignment rows) are
  excluded. `include_padding=True` gives the count with the LLM padding tokens in.
- Attention pairs: causal within each packed sample, len*(len+1)/2 query-key pairs; ViT
  bidirectional per image (len^2), and per window (sum of window_len^2) in windowed layers.
- Backward (flop_rules.py): dgrad = forward where a trained weight lies upstream, wgrad =
  forward where the weight trains, attention 2x forward where gradients flow through it. So full
  training is 3x forward (less the patch embedding's dgrad: pixels need no gradient); stage 1
  (text frozen) has no text wgrad; a frozen ViT at the input has no backward at all. Which parts
  train comes from the run's StageConfig.
- Not counted: activation recompute, flash attention's recomputed QK^T, and masked-out blocks
  kernels compute anyway (model FLOPs are independent of the implementation).
MFU = model FLOP/s per GPU / the dense bf16 peak; an FP8 run also reports it against the dense
FP8 peak (`mfu_fp8`), since only its GEMMs, not its attention, run in FP8.
The forward functions (`llm_flops`, `vision_flops`) take token/patch counts so the scaling
planner predicts with the very formulas the trainer reports MFU with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_navil.batch import NaViLBatch, padding_segments
from megatron_navil.config.model import SPECIAL_TOKENS, NaViLModelConfig
from megatron_navil.config.training import PARTS, StageConfig
from megatron_navil.geometry.window import window_order
from megatron_navil.training.flop_rules import Branches, FlopCount, Op, walk
from megatron_navil.training.step import counted_positions

# Dense (no sparsity) peaks per device, vendor datasheets, TFLOP/s.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}
FP8_PEAK_TFLOPS = {"H100": 1979.0, "H200": 1979.0, "H800": 1979.0, "B200": 4500.0}
ALL_PARTS = frozenset(PARTS)
# One line for logs and reports: what `tflops_per_gpu` / `mfu` count (module docstring).
CONVENTION = (
    "MFU convention: model matmul FLOPs (fwd + dgrad where a trained weight is upstream + wgrad "
    "of trained weights), padding excluded, causal/per-image/per-window attention pairs, no "
    "recompute; against the dense bf16 peak (FP8 runs also against the dense FP8 peak)"
)


def trained_parts(stage: StageConfig) -> frozenset:
    """The parts `stage` trains: what the backward rule needs from the run's config."""
    return frozenset(p for p in PARTS if stage.trains(p))


# ------------------------------------------------------------------ what one forward computes
def _experts(flops_per_row: float, text: float, visual: float, split: bool, part: str):
    """One projection: separate text/visual expert GEMMs when `split`, else one shared GEMM."""
    if not split:
        return Op(flops_per_row * (text + visual), "text", text + visual)
    return Branches(
        ((Op(flops_per_row * text, "text", text),), (Op(flops_per_row * visual, part, visual),))
    )


def llm_layer_ops(cfg: NaViLModelConfig, text: float, visual: float, pairs: float) -> list:
    """One decoder layer on `text` + `visual` rows with `pairs` causal query-key pairs.
    Shared norms are text weights (training/stages.classify); q/k norms follow their QKV."""
    llm, e = cfg.llm, cfg.experts
    d, f, rows = llm.hidden_size, llm.ffn_hidden_size, text + visual
    q, kv = llm.num_attention_heads * llm.kv_channels, llm.num_query_groups * llm.kv_channels
    ops = [Op(0.0, "text", rows)]  # input norm
    ops.append(_experts(2 * d * (q + 2 * kv), text, visual, e.attention_experts, "visual_experts"))
    ops.append(Op(2 * 2 * q * pairs, None, rows))  # QK^T + AV over every head
    if e.attention_experts and e.output_proj_mode == "composed":
        # wo on every token, then wo_ve on the visual ones (the released 2B code)
        ops += [
            Op(2 * q * d * rows, "text", rows),
            Op(2 * d * d * visual, "visual_experts", visual),
        ]
    else:
        ops.append(_experts(2 * q * d, text, visual, e.attention_experts, "visual_experts"))
    ops.append(Op(0.0, "text", rows))  # pre-FFN norm

    def ffn(n: float, part: str) -> tuple:
        return (Op(2 * 2 * d * f * n, part, n), Op(2 * f * d * n, part, n))  # gate+up, down

    if e.ffn_experts:
        ops.append(Branches((ffn(text, "text"), ffn(visual, "visual_experts"))))
    else:
        ops += list(ffn(rows, "text"))
    return ops


def lm_head_ops(cfg: NaViLModelConfig, rows: float, counted: float) -> list:
    """Final norm on all rows, LM head on the `counted` rows that take loss."""
    d = cfg.llm.hidden_size
    return [Op(0.0, "text", rows), Op(2 * d * cfg.llm.vocab_size * counted, "text", counted)]


def vision_layer_windowed(cfg: NaViLModelConfig, layer: int) -> bool:
    v = cfg.vision
    return v.window_size > 0 and layer not in v.fullatt_block_indexes


def vision_ops(
    cfg: NaViLModelConfig, patches: float, full_pairs: float, window_pairs: float
) -> list:
    """Patch embedding, encoder layers (windowed ones over `window_pairs`), connector."""
    v, d = cfg.vision, cfg.llm.hidden_size
    c, fv = v.hidden_size, v.ffn_hidden_size
    # The patch embedding reads pixels: it never needs dgrad (the walk starts with flows=False).
    ops = [Op(2 * v.num_channels * v.patch_size**2 * c * patches, "vision", patches)]
    for i in range(v.num_layers):
        pairs = window_pairs if vision_layer_windowed(cfg, i) else full_pairs
        # norms and LayerScale are vision weights like the GEMMs around them: no extra op needed
        ops += [
            Op(2 * c * 3 * c * patches, "vision", patches),  # qkv
            Op(2 * 2 * c * pairs, None, patches),  # QK^T + AV
            Op(2 * c * c * patches, "vision", patches),  # proj
            Op(2 * c * fv * patches, "vision", patches),  # fc1
            Op(2 * fv * c * patches, "vision", patches),  # fc2
        ]
    m2 = cfg.connector.merge_size**2
    merged = patches / m2
    ops += [
        Op(0.0, "connector", merged),  # LayerNorm(4C)
        Op(2 * m2 * c * d * merged, "connector", merged),
        Op(2 * d * d * merged, "connector", merged),
    ]
    return ops


# ------------------------------------------------------------------ forward-only (planner)
def _forward(ops: list) -> float:
    return walk(ops, frozenset(), False)[0].forward


def llm_flops(
    cfg: NaViLModelConfig,
    tokens: float,
    visual_tokens: float,
    causal_pairs: float,
    counted: float,
    num_layers: int | None = None,
) -> float:
    """Forward FLOPs of `num_layers` LLM layers (default all) on `tokens` packed tokens,
    `visual_tokens` of them visual, `causal_pairs` = sum over samples of len*(len+1)/2, plus the
    LM head on `counted` rows when num_layers is None (the whole LLM)."""
    layers = cfg.llm.num_layers if num_layers is None else num_layers
    flops = layers * _forward(
        llm_layer_ops(cfg, tokens - visual_tokens, visual_tokens, causal_pairs)
    )
    if num_layers is None:
        flops += lm_head_flops(cfg, counted)
    return flops


def lm_head_flops(cfg: NaViLModelConfig, counted: float) -> float:
    """Forward FLOPs of the LM head on the `counted` rows that get logits."""
    return _forward(lm_head_ops(cfg, 0.0, counted))


def vision_flops(
    cfg: NaViLModelConfig,
    patches: float,
    square_patches: float,
    window_pairs: Optional[float] = None,
) -> float:
    """Forward FLOPs of the vision encoder and the connector on `patches` patches, where
    `square_patches` = sum over images of n_patches^2 (full attention) and `window_pairs` the
    sum over windows of their squares (windowed layers; None = square_patches, i.e. no windows)."""
    window = square_patches if window_pairs is None else window_pairs
    return _forward(vision_ops(cfg, patches, square_patches, window))


# ------------------------------------------------------------------ a real micro-batch
@dataclass(frozen=True)
class BatchCounts:
    """The sizes of one micro-batch the FLOP count depends on."""

    tokens: float
    """LLM tokens (padding excluded unless asked for)."""
    visual: float
    """Of which visual (routed to the visual experts)."""
    causal_pairs: float
    """Sum over samples of len*(len+1)/2."""
    counted: float
    """Rows that take loss (LM head rows)."""
    special: bool
    """A special token other than <IMG_CONTEXT> is present (its trained embedding is used)."""
    patches: float
    """ViT patches (all images and scales)."""
    full_pairs: float
    """Sum over images of n_patches^2."""
    window_pairs: float
    """Sum over attention windows of their length^2 (= full_pairs without window attention)."""


def vision_pairs(cfg: NaViLModelConfig, grid_thw: torch.Tensor) -> tuple[float, float]:
    """(full, window) attention pairs of the ViT: each image (all its frames) is one segment;
    windows tile each frame as geometry/window.py does, in whole merge blocks."""
    m = cfg.connector.merge_size
    full = window = 0.0
    for t, h, w in grid_thw.tolist():
        full += float(t * h * w) ** 2
        if cfg.vision.window_size <= 0:
            continue
        ws = cfg.vision.window_size // (m * cfg.vision.patch_size)
        _, sizes = window_order(h // m, w // m, ws)
        window += t * sum(float(s * m * m) ** 2 for s in sizes)
    return full, (window if cfg.vision.window_size > 0 else full)


def batch_counts(
    cfg: NaViLModelConfig, batch: NaViLBatch, include_padding: bool = False
) -> BatchCounts:
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(torch.float64)
    real = torch.ones(batch.num_tokens, dtype=torch.bool)
    if not include_padding:
        for i in padding_segments(batch):
            real[int(batch.cu_seqlens[i]) : int(batch.cu_seqlens[i + 1])] = False
            lens[i] = 0.0
    tokens = batch.tokens.cpu()[real]
    idx = tokens - cfg.llm.first_special_token_id
    special = (idx >= 0) & (idx < len(SPECIAL_TOKENS)) & (tokens != cfg.img_context_id)
    patches = full = window = 0.0
    if batch.grid_thw is not None and batch.grid_thw.numel():
        patches = float(batch.grid_thw.prod(dim=1).sum())
        full, window = vision_pairs(cfg, batch.grid_thw.cpu())
    return BatchCounts(
        tokens=float(real.sum()),
        visual=float(cfg.visual_token_mask(tokens).sum()),
        causal_pairs=float((lens * (lens + 1) / 2).sum()),
        counted=float(counted_positions(batch, cfg.img_context_id).cpu()[real].sum()),
        special=bool(special.any()),
        patches=patches,
        full_pairs=full,
        window_pairs=window,
    )


@dataclass(frozen=True)
class PartCounts:
    """FLOPs of one micro-batch by component (the planner places them on pipeline stages)."""

    vision: FlopCount
    """Patch embedding, ViT layers and connector."""
    layers: tuple[FlopCount, ...]
    """Each LLM decoder layer (they differ only in backward: gradients start flowing at the
    first trained weight)."""
    head: FlopCount
    """Final norm and LM head."""

    @property
    def total(self) -> FlopCount:
        out = self.vision + self.head
        for layer in self.layers:
            out = out + layer
        return out


def part_counts(
    cfg: NaViLModelConfig, c: BatchCounts, trained: frozenset = ALL_PARTS
) -> PartCounts:
    """Forward and backward FLOPs of a micro-batch of sizes `c` when `trained` parts train."""
    vision, vision_flows = FlopCount(), False
    if c.patches:
        vision, vision_flows = walk(
            vision_ops(cfg, c.patches, c.full_pairs, c.window_pairs), trained, False
        )
    # The LLM input needs a gradient if a trained embedding or the connector produced it.
    flows = (
        ("text" in trained and c.tokens > 0)
        or ("special_tokens" in trained and c.special)
        or vision_flows
    )
    layer, layers = llm_layer_ops(cfg, c.tokens - c.visual, c.visual, c.causal_pairs), []
    for _ in range(cfg.llm.num_layers):
        count, flows = walk(layer, trained, flows)
        layers.append(count)
    head = walk(lm_head_ops(cfg, c.tokens, c.counted), trained, flows)[0]
    return PartCounts(vision, tuple(layers), head)


def count_flops(cfg: NaViLModelConfig, c: BatchCounts, trained: frozenset = ALL_PARTS) -> FlopCount:
    """Forward and backward FLOPs of one micro-batch of sizes `c` when `trained` parts train."""
    return part_counts(cfg, c, trained).total


def window_pairs_estimate(cfg: NaViLModelConfig, patches: float, square_patches: float) -> float:
    """Windowed-layer attention pairs of images of square_patches / patches patches each (the
    planner's image mix), taking every window as full: patches x min(image, window) patches."""
    if cfg.vision.window_size <= 0 or not patches:
        return square_patches
    per_window = (cfg.vision.window_size // cfg.vision.patch_size) ** 2
    return patches * min(square_patches / patches, per_window)


def micro_batch_count(
    cfg: NaViLModelConfig,
    batch: NaViLBatch,
    trained: frozenset = ALL_PARTS,
    include_padding: bool = False,
) -> FlopCount:
    """Forward and backward model FLOPs of one packed micro-batch (module docstring)."""
    return count_flops(cfg, batch_counts(cfg, batch, include_padding), trained)


def micro_batch_flops(
    cfg: NaViLModelConfig, batch: NaViLBatch, trained: frozenset = ALL_PARTS
) -> float:
    """Model FLOPs (forward + backward) of one packed micro-batch: the MFU numerator."""
    return micro_batch_count(cfg, batch, trained).total


def peak_tflops(configured: Optional[float], fp8: bool = False) -> Optional[float]:
    """Per-device dense peak for MFU (bf16, or FP8 with `fp8`): the configured value, else a
    known GPU's datasheet value, else None."""
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in (FP8_PEAK_TFLOPS if fp8 else PEAK_TFLOPS).items():
            if key in name:
                return value
    return None
