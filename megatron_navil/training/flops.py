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
"""

from __future__ import annotations

import torch

from megatron_navil.batch import NaViLBatch
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.training.step import counted_positions

# Dense bf16 peak per device (vendor spec, TFLOP/s), used for MFU when not configured.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def micro_batch_flops(cfg: NaViLModelConfig, batch: NaViLBatch) -> float:
    llm, v = cfg.llm, cfg.vision
    d, f = llm.hidden_size, llm.ffn_hidden_size
    q, kv = llm.num_attention_heads * llm.kv_channels, llm.num_query_groups * llm.kv_channels
    tokens = batch.num_tokens
    visual = int(cfg.visual_token_mask(batch.tokens).sum())
    per_token = 2 * d * (q + 2 * kv) + 2 * q * d + 2 * 3 * d * f
    flops = llm.num_layers * per_token * tokens
    if cfg.experts.attention_experts and cfg.experts.output_proj_mode == "composed":
        flops += llm.num_layers * 2 * d * d * visual
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(torch.float64)
    flops += llm.num_layers * 2 * 2 * q * float((lens * (lens + 1) / 2).sum())
    counted = int(counted_positions(batch, cfg.img_context_id).sum())
    flops += 2 * d * llm.vocab_size * counted

    if batch.grid_thw is not None and batch.grid_thw.numel():
        c, fv = v.hidden_size, v.ffn_hidden_size
        n_img = batch.grid_thw.prod(dim=1).to(torch.float64)
        patches = float(n_img.sum())
        per_patch = 2 * c * 3 * c + 2 * c * c + 2 * 2 * c * fv
        flops += v.num_layers * per_patch * patches
        flops += 2 * v.num_channels * v.patch_size**2 * c * patches
        flops += v.num_layers * 2 * 2 * c * float((n_img**2).sum())
        m2 = cfg.connector.merge_size**2
        flops += (2 * m2 * c * d + 2 * d * d) * patches / m2
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
