"""Host-side metadata of one packed micro-batch, computed once on the CPU where the pack is built.

Every fact the model needs as a host int (segment lengths, the longest segment, how many
tokens are visual, each image's grid) or as an index the host would otherwise get by reading a
device tensor (`nonzero` of the <IMG_CONTEXT> slots and of the loss rows; 2D RoPE angles made
by a Python loop over images; the vision window permutation) is known to the loader's builder
(data/builder.py) before the batch leaves the CPU. Computing it there, in the loader thread,
and handing it over with the batch lets the model's forward run without reading any device
tensor on the host (each read stalls the CPU until the GPU has caught up) and without copying
from pageable memory (the tensors here are pinned by the loader when CUDA is available and move
with `NaViLBatch.to(device, non_blocking=True)`).

The model takes `pack_meta` when given and computes the same values from the device tensors
when it is not (inference, hand-made batches): same numbers either way
(tests/data/test_pack_meta.py). The switch is `data.host_pack_metadata` (--host-pack-metadata).

What is NOT here, because it depends on the model's parallel layout rather than the pack: the
padding rows the vision encoder adds for SP / FP8 (the model appends that segment itself, on
the device) and the modality routing's grouped order (computed on the device from the mask:
elementwise ops, no host read, once `num_visual` is known).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.geometry.rope import rope_2d
from megatron_navil.geometry.window import WindowPlan

Grid = tuple[int, int, int]


def _cu(seqlens: Sequence[int]) -> tuple[int, ...]:
    out = [0]
    for s in seqlens:
        out.append(out[-1] + s)
    return tuple(out)


def _map_tensors(obj, fn):
    """A copy of a frozen metadata dataclass with `fn` applied to each tensor field."""
    changes = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            changes[f.name] = fn(v)
        elif dataclasses.is_dataclass(v):
            changes[f.name] = _map_tensors(v, fn)
    return dataclasses.replace(obj, **changes)


def _pin(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory()


@dataclass(frozen=True)
class VisionMeta:
    """The vision encoder's per-pack metadata (all images / scales of the pack, in order)."""

    grids: tuple[Grid, ...]
    """(t, h, w) in patches per image or scale: grid_thw as host ints."""
    rope: torch.Tensor
    """float32 [N_patches, 1, 1, head_dim]: the 2D RoPE angles (geometry/rope.py rope_2d), made on
    the CPU exactly as the model would make them."""
    cu_seqlens: torch.Tensor
    """int32 [n_grids + 1]: per-image attention segments (cumulative patch counts)."""
    host_cu_seqlens: tuple[int, ...]
    """`cu_seqlens` as host ints (the CPU attention stand-in loops over them)."""
    window_perm: Optional[torch.Tensor] = None
    """long [N_patches]: patch order of the windowed layers (geometry/window.py), without the
    SP/FP8 padding segment; None without window attention."""
    window_cu_seqlens: Optional[torch.Tensor] = None
    """int32: window segments in window order (without the padding segment)."""
    host_window_cu_seqlens: tuple[int, ...] = ()
    """`window_cu_seqlens` as host ints."""

    @property
    def num_patches(self) -> int:
        return self.host_cu_seqlens[-1]

    @classmethod
    def build(cls, cfg: NaViLModelConfig, grids: Sequence[Sequence[int]]) -> "VisionMeta":
        """From host grids (t, h, w), on the CPU."""
        grids = tuple((int(t), int(h), int(w)) for t, h, w in grids)
        v, m = cfg.vision, cfg.connector.merge_size
        grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
        host_cu = _cu([t * h * w for t, h, w in grids])
        kw: dict[str, Any] = {}
        if v.window_size:
            perm, seqlens = WindowPlan.from_config(cfg).plan(grids, pad=0)
            host_w = _cu(seqlens)
            kw = dict(
                window_perm=perm,
                window_cu_seqlens=torch.tensor(host_w, dtype=torch.int32),
                host_window_cu_seqlens=host_w,
            )
        return cls(
            grids=grids,
            rope=rope_2d(grid_thw, v.head_dim, v.rope_theta, m),
            cu_seqlens=torch.tensor(host_cu, dtype=torch.int32),
            host_cu_seqlens=host_cu,
            **kw,
        )

    def to(self, device: Any) -> "VisionMeta":
        return _map_tensors(self, lambda t: t.to(device, non_blocking=True))


@dataclass(frozen=True)
class PackMeta:
    """Host-side facts of one packed micro-batch (module docstring); built by `build`."""

    seqlens: tuple[int, ...]
    """Token count of each packed sample, the padding "sample" included (sums to T)."""
    max_seqlen: int
    """Longest sample: the attention kernels' max_seqlen."""
    num_visual: int
    """Tokens routed to the visual experts (the modality mask's popcount)."""
    image_slots: torch.Tensor
    """long [n_visual_features]: positions of the <IMG_CONTEXT> tokens, where the connector's
    outputs are written, in order."""
    loss_rows: torch.Tensor
    """long [n]: positions that take loss (loss_mask != 0 and input not <IMG_CONTEXT>): the only
    rows that go through the LM head in training."""
    text_rows: torch.Tensor
    """long [m]: positions whose input is not <IMG_CONTEXT>: the rows that get logits without
    labels (inference, generation)."""
    vision: Optional[VisionMeta] = None
    """The vision encoder's metadata; None for a pack without images."""

    @property
    def host_cu_seqlens(self) -> tuple[int, ...]:
        return _cu(self.seqlens)

    @classmethod
    def build(cls, cfg: NaViLModelConfig, batch: Any) -> "PackMeta":
        """From a NaViLBatch's CPU tensors (typed Any: batch.py sits above this module and
        imports it) (the loader's, before they move). Also runs the value
        checks the model skips when it gets metadata (`NaViLBatch.validate`)."""
        batch.validate(cfg)
        tokens = batch.tokens.reshape(-1)
        cu = batch.cu_seqlens.tolist()
        seqlens = tuple(b - a for a, b in zip(cu[:-1], cu[1:]))
        mask = batch.modality_mask
        if mask is None:
            mask = cfg.visual_token_mask(tokens)
        not_image = tokens != cfg.img_context_id
        # the same expressions as the model's fallback (language.py), so the rows are the same
        loss_rows = ((batch.loss_mask.reshape(-1).float() != 0) & not_image).nonzero().squeeze(1)
        vision = None
        if batch.grid_thw is not None and batch.grid_thw.numel():
            vision = VisionMeta.build(cfg, batch.grid_thw.tolist())
        return cls(
            seqlens=seqlens,
            max_seqlen=max(seqlens) if seqlens else 0,
            num_visual=int(mask.reshape(-1).sum()),
            image_slots=(~not_image).nonzero().squeeze(1),
            loss_rows=loss_rows,
            text_rows=not_image.nonzero().squeeze(1),
            vision=vision,
        )

    def head_rows(
        self, labels: Optional[torch.Tensor], loss_mask: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """The LM head's rows for a forward with these arguments: `text_rows` without labels,
        `loss_rows` with labels and the batch's loss_mask (they were taken from it), None (the
        model finds them) for labels without a mask."""
        if labels is None:
            return self.text_rows
        return None if loss_mask is None else self.loss_rows

    def trimmed(self, keep: int) -> "PackMeta":
        """This metadata for the batch cut to its first `keep` tokens by
        NaViLBatch.trim_padding: only the trailing padding sample shrinks (or goes), and the
        rows cut are padding, all of them text rows at the end of `text_rows`; loss rows, image
        slots and the vision part are untouched. Host arithmetic only."""
        total = sum(self.seqlens)
        cut = total - keep
        if cut <= 0:
            return self
        last = self.seqlens[-1] - cut
        if last < 0:
            raise ValueError(f"cannot cut {cut} tokens: the last segment has {self.seqlens[-1]}")
        seqlens = self.seqlens[:-1] + ((last,) if last else ())
        return dataclasses.replace(
            self,
            seqlens=seqlens,
            max_seqlen=max(seqlens) if seqlens else 0,
            text_rows=self.text_rows[: self.text_rows.shape[0] - cut],
        )

    def to(self, device: Any) -> "PackMeta":
        """Tensors moved (asynchronously from pinned memory); host ints unchanged."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "PackMeta":
        """CPU tensors in page-locked memory, so `to(cuda)` is a real asynchronous copy."""
        return _map_tensors(self, _pin)

    def check_matches(self, num_tokens: int, cu_numel: int) -> None:
        """Host-only consistency with the batch it travels with (no device read)."""
        if sum(self.seqlens) != num_tokens or len(self.seqlens) + 1 != cu_numel:
            raise ValueError(
                f"pack metadata describes {len(self.seqlens)} segments of {sum(self.seqlens)} "
                f"tokens, the batch has {cu_numel - 1} segments of {num_tokens}: the batch was "
                "changed after its metadata was built (rebuild it with PackMeta.build)"
            )


__all__ = ["PackMeta", "VisionMeta"]
