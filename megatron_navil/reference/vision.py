"""The native-resolution vision encoder, in the layout of the released `vision_model.*` weights.

```
pixel_values [N, 3*P*P]  (patches of all images/scales, merge-block-major within each)
  -> patch_embedding (Conv2d(3, C, P, stride P) on each 3xPxP tile)          [N, C]
  -> [window permutation, only when window_size > 0]
  -> L x { x += ls1 * attn(norm1(x));  x += ls2 * mlp(norm2(x)) }             [N, C]
       attn: fused qkv -> (optional full-width q/k RMSNorm) -> 2D RoPE -> softmax attention
             confined to one image/scale (or one window in windowed layers) -> proj
  -> [inverse window permutation unless keep_window_order]
```
No absolute position embedding, no CLS token, no final norm.

Window attention follows the released encoder (Qwen2.5-VL style): the patches of each image are
reordered so that each window of `ws x ws` merged tokens (ws = window_size / (P * merge)) is
contiguous, windows row-major, merged tokens row-major inside a window, the 2x2 patches of a
merged token staying together. Layers listed in `fullatt_block_indexes` attend over the whole
image, the others within their window. The released code never undoes the reordering, so its
merged tokens reach the LLM in window order; `keep_window_order=True` reproduces that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_navil.config.model import VisionConfig
from megatron_navil.reference.common import RMSNorm, attention, segment_ids
from megatron_navil.reference.rope import apply_rotary, vision_patch_positions, vision_rope_angles


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            # Over the full width C (all heads together), as InternViT does.
            self.q_norm = RMSNorm(c, cfg.norm_eps)
            self.k_norm = RMSNorm(c, cfg.norm_eps)
        self.proj = nn.Linear(c, c)

    def forward(
        self, x: torch.Tensor, angles: torch.Tensor, segments: torch.Tensor
    ) -> torch.Tensor:
        n, c = x.shape
        # Output rows of qkv are [q (all heads); k; v], each head-major: [N, 3C] -> 3 x [N, C]
        q, k, v = self.qkv(x).split(c, dim=-1)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(n, self.num_heads, -1)  # [N, C] -> [N, heads, hd]
        k = k.reshape(n, self.num_heads, -1)
        v = v.reshape(n, self.num_heads, -1)
        q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        out = attention(q, k, v, segments, causal=False)  # [N, heads, hd]
        return self.proj(out.reshape(n, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GELU: the released config's hidden_act is "gelu" (HF GELUActivation).
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layerscale_init))
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layerscale_init))

    def forward(
        self, x: torch.Tensor, angles: torch.Tensor, segments: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x), angles, segments)
        return x + self.ls2 * self.mlp(self.norm2(x))


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        p = cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=p, stride=p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight  # [C, 3, P, P]
        tiles = pixel_values.reshape(-1, *w.shape[1:]).to(w.dtype)  # [N, 3*P*P] -> [N, 3, P, P]
        return self.patch_embedding(tiles).flatten(1)  # [N, C, 1, 1] -> [N, C]


class VisionEncoder(nn.Module):
    """`vision_model.encoder`: only holds the layers (the loop lives in VisionModel.forward)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))


class VisionModel(nn.Module):
    """`vision_model.*`: patch embedding + encoder. forward -> [N_patches, C]."""

    def __init__(self, cfg: VisionConfig, merge_size: int):
        super().__init__()
        self.cfg = cfg
        self.merge_size = merge_size
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg, m = self.cfg, self.merge_size
        grid_thw = check_grid_thw(grid_thw, m)
        sizes = (grid_thw[:, 1] * grid_thw[:, 2]).tolist()
        n = sum(sizes)
        if pixel_values.shape[0] != n:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but grid_thw describes {n}"
            )
        x = self.embeddings(pixel_values)  # [N, C]
        angles = vision_rope_angles(
            vision_patch_positions(grid_thw, m), cfg.head_dim, cfg.rope_theta
        )
        image_segments = segment_ids(torch.tensor([0] + sizes).cumsum(0), n)
        window_segments = image_segments
        order = None
        if cfg.window_size > 0:
            ws = cfg.window_size // (cfg.patch_size * m)  # window side in merged tokens
            order, window_lengths = window_order(grid_thw, m, ws)
            # Permute patches (and their RoPE angles) into window order; images stay contiguous
            # because windows never cross an image, so the per-image segments still apply.
            x, angles = x[order], angles[order]
            window_segments = segment_ids(torch.tensor([0] + window_lengths).cumsum(0), n)
        full = set(cfg.fullatt_block_indexes)
        for i, layer in enumerate(self.encoder.layers):
            windowed = cfg.window_size > 0 and i not in full
            x = layer(x, angles, window_segments if windowed else image_segments)
        if order is not None and not cfg.keep_window_order:
            x = x[torch.argsort(order)]  # back to row order (merge-block-major)
        return x


def check_grid_thw(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Validate grid_thw [N, 3] rows (1, h, w) with h, w multiples of merge_size; return it long."""
    g = torch.as_tensor(grid_thw).to(torch.long).cpu()
    if g.ndim != 2 or g.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [N, 3] (t, h, w); got {tuple(g.shape)}")
    for t, h, w in g.tolist():
        if t != 1 or h <= 0 or w <= 0 or h % merge_size or w % merge_size:
            raise ValueError(
                f"grid_thw row {(t, h, w)}: need t = 1 and h, w positive multiples of "
                f"merge size {merge_size} (patches)"
            )
    return g


def window_order(
    grid_thw: torch.Tensor, merge_size: int, window: int
) -> tuple[torch.Tensor, list[int]]:
    """Patch permutation into window order and the window lengths (in patches).

    For each image (h x w patches, hm x wm merged tokens), windows of `window` x `window` merged
    tokens tile the merged grid from the top-left (the last row/column of windows may be
    partial); windows are visited row-major, merged tokens row-major inside a window, and each
    merged token keeps its m*m patches in place. Returns (order [N] long, lengths): packed
    position i of the permuted sequence holds original patch order[i].
    """
    if window <= 0:
        raise ValueError(f"window side must be at least one merged token, got {window}")
    unit = merge_size * merge_size
    order, lengths, offset = [], [], 0
    for _, h, w in grid_thw.tolist():
        hm, wm = h // merge_size, w // merge_size
        merged = torch.arange(hm * wm).view(hm, wm)  # merged-token ids, row-major
        for r0 in range(0, hm, window):
            for c0 in range(0, wm, window):
                ids = merged[r0 : r0 + window, c0 : c0 + window].reshape(-1)  # row-major in window
                # merged token j covers patches [unit*j, unit*j + unit)
                patches = (ids[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)
                order.append(patches + offset)
                lengths.append(patches.numel())
        offset += h * w
    return torch.cat(order), lengths
