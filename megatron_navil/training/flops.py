"""Model FLOPs of one packed micro-batch (forward + backward = 3 x forward), for TFLOP/s and MFU.

Counts matmul FLOPs (2 per multiply-add) of what the model actually computes:
- LLM, per token and layer: QKV, output projection (+ the second projection of visual tokens in
  the composed mode), SwiGLU (3 GEMMs). Each token uses ONE expert, so experts add no FLOPs.
- LLM attention, per layer: causal within each packed sample, 2 GEMMs (QK^T, AV) over
  len*(len+1)/2 query-key pairs per sample.
- LM head only on the rows that get logits (counted loss positions).
- Vision encoder, per patch and layer: qkv, proj, GELU MLP; patch embedding; attention
  bidirectional within each image/scale (len^2 pairs) — the vision side's cost grows with the
  square of the image size, which is why it dominates for large images.
- Connector per merged token.
The count functions take token/patch counts (`llm_flops`, `vision_flops`), so the scaling
planner predicts with the very formulas the trainer reports MFU with.
"""

from __future__ import annotations

import torch

from megatron_navil.batch import NaViLBatch
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.training.step import counted_positions

# Dense bf16 peak per device (vendor spec, TFLOP/s), used for MFU when not configured.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def llm_flops(
    cfg: NaViLModelConfig,
    tokens: float,
    visual_tokens: float,
    causal_pairs: float,
    counted: float,
    num_layers: int | None = None,
) -> float:
    """Forward matmul FLOPs of `num_layers` LLM layers (default all) on `tokens` packed tokens,
    `visual_tokens` of them visual, `causal_pairs` = sum over samples of len*(len+1)/2, plus the
    LM head on `counted` rows when num_layers is None (the whole LLM)."""
    llm = cfg.llm
    layers = llm.num_layers if num_layers is None else num_layers
    d, f = llm.hidden_size, llm.ffn_hidden_size
    q, kv = llm.num_attention_heads * llm.kv_channels, llm.num_query_groups * llm.kv_channels
    per_token = 2 * d * (q + 2 * kv) + 2 * q * d + 2 * 3 * d * f
    flops = layers * per_token * tokens
    if cfg.experts.attention_experts and cfg.experts.output_proj_mode == "composed":
        flops += layers * 2 * d * d * visual_tokens
    flops += layers * 2 * 2 * q * causal_pairs
    if num_layers is None:
        flops += lm_head_flops(cfg, counted)
    return flops


def lm_head_flops(cfg: NaViLModelConfig, counted: float) -> float:
    """Forward FLOPs of the LM head on the `counted` rows that get logits."""
    return 2 * cfg.llm.hidden_size * cfg.llm.vocab_size * counted


def vision_flops(cfg: NaViLModelConfig, patches: float, square_patches: float) -> float:
    """Forward FLOPs of the vision encoder and the connector on `patches` patches, where
    `square_patches` = sum over images (each scale) of n_patches^2 (bidirectional attention)."""
    v, d = cfg.vision, cfg.llm.hidden_size
    c, fv = v.hidden_size, v.ffn_hidden_size
    per_patch = 2 * c * 3 * c + 2 * c * c + 2 * 2 * c * fv
    flops = v.num_layers * per_patch * patches
    flops += 2 * v.num_channels * v.patch_size**2 * c * patches
    flops += v.num_layers * 2 * 2 * c * square_patches
    m2 = cfg.connector.merge_size**2
    flops += (2 * m2 * c * d + 2 * d * d) * patches / m2
    return flops


def micro_batch_flops(cfg: NaViLModelConfig, batch: NaViLBatch) -> float:
    """Model FLOPs (forward + backward) of one packed micro-batch."""
    visual = int(cfg.visual_token_mask(batch.tokens).sum())
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(torch.float64)
    counted = int(counted_positions(batch, cfg.img_context_id).sum())
    pairs = float((lens * (lens + 1) / 2).sum())
    flops = llm_flops(cfg, batch.num_tokens, visual, pairs, counted)
    if batch.grid_thw is not None and batch.grid_thw.numel():
        n_img = batch.grid_thw.prod(dim=1).to(torch.float64)
        flops += vision_flops(cfg, float(n_img.sum()), float((n_img**2).sum()))
    return 3.0 * flops


def peak_tflops(configured: float | None) -> float | None:
    """Per-device peak for MFU: the configured value, else a known GPU's spec, else None."""
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None
