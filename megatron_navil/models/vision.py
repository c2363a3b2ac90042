"""Native-resolution vision encoder and the connector.

pixel_values [N, 3*P*P] (patches of all images/scales, merge-block order), grid_thw [n, 3]
  -> patch_embed (Linear == Conv2d(3, C, P, stride P) on each patch tile)      [N, C]
  -> pad N for SP / FP8 (an extra, self-attending padding segment)
  -> L x NaViLTransformerLayer (2D RoPE, bidirectional attention within each image/scale)
  -> drop padding                                                               [N, C]
connector:
  -> pixel shuffle 2x2: 4 consecutive patches -> one token, channels (0,0),(0,1),(1,0),(1,1)
  -> LayerNorm(4C) -> Linear(4C, D) -> GELU -> Linear(D, D)                     [N/4, D]
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.geometry.window import WindowPlan
from megatron_navil.models.backends import Backend
from megatron_navil.models.layer import NaViLTransformerBlock
from megatron_navil.models.packing import append_segment, thd_params
from megatron_navil.models.specs import block_submodules, vision_layer_spec
from megatron_navil.models.tp_regions import TPRegion
from megatron_navil.pack_meta import VisionMeta


def _device(config):
    return None if config.use_cpu_initialization else torch.cuda.current_device()


def check_grid(
    cfg: NaViLModelConfig,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    grids: Optional[Sequence[Sequence[int]]] = None,
) -> Sequence[Sequence[int]]:
    """Clear errors for inputs the encoder cannot take. `grids`: grid_thw as host ints (from
    the pack metadata); None reads them from grid_thw (a device read). Returns the grids."""
    v, m = cfg.vision, cfg.connector.merge_size
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
        raise ValueError(
            f"grid_thw must be [num_images, 3] (t, h, w in patches), got {tuple(grid_thw.shape)}"
        )
    patch_dim = v.num_channels * v.patch_size**2
    if pixel_values.ndim != 2 or pixel_values.shape[1] != patch_dim:
        raise ValueError(
            f"pixel_values must be [num_patches, {patch_dim}], got {tuple(pixel_values.shape)}"
        )
    if grids is None:
        grids = grid_thw.tolist()
    for i, (t, h, w) in enumerate(grids):
        if h < m or w < m:
            raise ValueError(
                f"image {i} is {h}x{w} patches ({h * v.patch_size}x{w * v.patch_size} px), smaller "
                f"than one merged {m}x{m} block of {v.patch_size}px patches; resize it to at least "
                f"{m * v.patch_size}x{m * v.patch_size} px (the loader's min_dynamic_patch does "
                "this)"
            )
        if h % m or w % m:
            raise ValueError(
                f"image {i}: grid {h}x{w} is not a multiple of the {m}x{m} merge block"
            )
    expected = sum(t * h * w for t, h, w in grids)
    if pixel_values.shape[0] != expected:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patches but grid_thw describes {expected}"
        )
    return grids


class VisionEncoder(MegatronModule):
    """The native-resolution ViT (flow in the module docstring): patch embedding, then
    NaViLTransformerLayers over the packed patches of all images, each image (or scale) its own
    bidirectional attention segment, optionally with window attention (WindowPlan).

    Runs whole on the first pipeline stage; its heads are split over the TP group of
    `pg_collection` (the model's collection), and with sequence parallelism the patch sequence
    is split over the same group inside the layers.
    """

    def __init__(
        self,
        cfg: NaViLModelConfig,
        config,
        backend: Backend,
        pg_collection: ProcessGroupCollection,
    ):
        super().__init__(config=config)
        v = cfg.vision
        self.cfg = cfg
        self.patch_embed = torch.nn.Linear(
            v.num_channels * v.patch_size**2,
            v.hidden_size,
            device=_device(config),
            dtype=config.params_dtype,
        )
        with torch.no_grad():
            config.init_method(self.patch_embed.weight)
            self.patch_embed.bias.zero_()
        self.decoder = NaViLTransformerBlock(
            config,
            block_submodules(vision_layer_spec(cfg, backend), v.num_layers, None),
            post_layer_norm=False,
            pre_process=True,
            post_process=True,
            pg_collection=pg_collection,
        )
        self.tp_region = TPRegion.of(config, pg_collection.tp)
        self.row_multiple = backend.fp8_row_multiple
        self.window = WindowPlan.from_config(cfg) if v.window_size else None

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        meta: Optional[VisionMeta] = None,
    ) -> torch.Tensor:
        """`meta`: the pack's vision metadata on pixel_values' device (pack_meta.py); None:
        made here from grid_thw (one read of grid_thw and pageable copies to the device)."""
        if meta is None:
            grids = check_grid(self.cfg, pixel_values, grid_thw)
            meta = VisionMeta.build(self.cfg, grids).to(pixel_values.device)
        else:
            check_grid(self.cfg, pixel_values, grid_thw, meta.grids)
        x = self.patch_embed(pixel_values.to(self.config.params_dtype))  # [N, C]
        freqs = meta.rope  # [N, 1, 1, head_dim] float32
        cu, host_cu = meta.cu_seqlens, meta.host_cu_seqlens
        n = x.shape[0]

        chunks, _ = self.tp_region.sequence_chunk
        multiple = self.row_multiple * chunks  # every SP chunk gets whole FP8 row blocks
        pad = -n % multiple
        if pad:  # the padding rows form their own segment, so no real patch attends to them
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
            freqs = torch.cat([freqs, freqs.new_zeros((pad,) + freqs.shape[1:])])
            cu, host_cu = append_segment(cu, host_cu, pad)
        packed = thd_params(cu, host_cu)
        window_packed = perm = None
        if self.window is not None:
            perm, wcu, host_wcu = (
                meta.window_perm,
                meta.window_cu_seqlens,
                meta.host_window_cu_seqlens,
            )
            if pad:  # the padding segment stays last and whole in window order too
                perm = torch.cat([perm, torch.arange(n, n + pad, device=perm.device)])
                wcu, host_wcu = append_segment(wcu, host_wcu, pad)
            x, freqs = self.window.enter(x, freqs, perm)
            window_packed = thd_params(wcu, host_wcu)

        h = self.tp_region.scatter_sequence(x[:, None, :])  # [N, 1, C] -> [N / tp, 1, C] (SP)
        h = self.decoder(
            h, rotary_freqs=freqs, packed_seq_params=packed, window_packed_seq_params=window_packed
        )
        # Everything downstream is replicated over TP, so gradients arriving here are identical
        # on all ranks: backward splits rather than reduce-scatters.
        h = self.tp_region.gather_sequence(h, grad_is_partial=False)  # [N, 1, C]
        h = h[:, 0, :]
        if self.window is not None:
            h = self.window.leave(h, perm)
        return h[:n]


class Connector(MegatronModule):
    """2x2 pixel shuffle + mlp1 (LayerNorm -> Linear -> GELU -> Linear); replicated over TP."""

    def __init__(self, cfg: NaViLModelConfig, config):
        super().__init__(config=config)
        c4 = cfg.vision.hidden_size * cfg.connector.merge_size**2
        d = cfg.llm.hidden_size
        kw = dict(device=_device(config), dtype=config.params_dtype)
        self.merge = cfg.connector.merge_size**2
        self.layernorm = torch.nn.LayerNorm(c4, eps=cfg.connector.layernorm_eps, **kw)
        self.linear_fc1 = torch.nn.Linear(c4, d, **kw)
        self.linear_fc2 = torch.nn.Linear(d, d, **kw)
        with torch.no_grad():
            for lin in (self.linear_fc1, self.linear_fc2):
                config.init_method(lin.weight)
                lin.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # [N, C] -> [N/4, 4C]: the 4 patches of a merge block are consecutive (merge-block order).
        x = features.reshape(-1, self.merge * features.shape[-1])
        return self.linear_fc2(F.gelu(self.linear_fc1(self.layernorm(x))))
