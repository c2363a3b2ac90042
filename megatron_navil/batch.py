"""The batch contract between the data loader and the model — documented here, in one place.

A micro-batch is ONE packed sequence in THD form: several samples concatenated along the token
dimension, each attending causally only to itself (cu_seqlens), positions restarting at 0 per
sample. Images of all samples are concatenated the same way on the vision side.

| field          | dtype / shape            | meaning |
|----------------|--------------------------|---------|
| tokens         | long [T]                 | token ids; images appear as `<img>`, rows of `<IMG_CONTEXT>` + `<IMG_LINE_BREAK>`, `<IMG_FRAME_BREAK>` per scale, `</img>` |
| labels         | long [T]                 | target of position t (= tokens[t+1] inside a sample); anything where loss_mask is 0 |
| loss_mask      | float [T]                | per-position loss weight (0 = no loss; captions: the text; chats: assistant turns). Positions whose INPUT is `<IMG_CONTEXT>` never take loss, whatever the mask says |
| position_ids   | long [T]                 | 0..len-1 within each sample |
| cu_seqlens     | int32 [n_samples + 1]    | sample boundaries; the last entry is T. Padding to a fixed T is a final "sample" with loss_mask 0 |
| pixel_values   | float [N_patches, 3*P*P] | patches of every image/scale, each flattened (c, ph, pw), merge-block order (h/2, w/2, 2, 2), normalised to [-1, 1]; None for text-only packs |
| grid_thw       | long [n_grids, 3]        | (t=1, h, w) in patches per image or per scale, in the order their `<IMG_CONTEXT>` runs appear in tokens |
| modality_mask  | bool [T] or None         | visual tokens (`<IMG_CONTEXT>` and `<img>`); derived from tokens when None |
| pack_meta      | PackMeta or None         | the same facts as host ints / precomputed indices (megatron_navil/pack_meta.py), made by the loader so the model reads no device tensor on the host; computed by the model when None |

`metadata["padding_tokens"]` (one pack) or `["padding_segments"]` (concatenated packs) marks
the padding segments (`padding_segments`): the FLOP count leaves them out (training/flops.py).
T is fixed per run (the loader pads to `--seq-length`, a multiple of 16 for FP8 and of the TP
size for sequence parallelism); N_patches is free. With pipeline size 1 the training step trims
the padding again (`trim_padding`, config training.trim_padding): T is then the real tokens
rounded up to a multiple of 16 (and of the FP8 row multiple / TP size under SP).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.pack_meta import PackMeta


@dataclass
class NaViLBatch:
    """One packed THD micro-batch (the module docstring's table is the contract of each field)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    pixel_values: Optional[torch.Tensor] = None
    grid_thw: Optional[torch.Tensor] = None
    modality_mask: Optional[torch.Tensor] = None
    pack_meta: Optional[PackMeta] = None
    """Host-side metadata of this pack (megatron_navil/pack_meta.py); None: the model computes
    it. Built from the fields above: rebuild it (PackMeta.build) after changing them."""
    metadata: dict = dataclasses.field(default_factory=dict)
    """Loader bookkeeping (sample keys, skipped images, ...); never read by the model."""

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def to(self, device: Any) -> "NaViLBatch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
            elif isinstance(v, PackMeta):
                moved[k] = v.to(device)  # its tensors move non_blocking too
        return NaViLBatch(**moved)

    def trim_padding(self, multiple: int) -> "NaViLBatch":
        """This batch with its trailing padding cut so T becomes the smallest multiple of
        `multiple` that keeps every real token (the batch itself when nothing can go).

        The padding is the final cu_seqlens "sample" of `metadata["padding_tokens"]` tokens
        (the loader's record; a batch without it is returned unchanged: a zero-loss final
        sample may be real, e.g. an image whose encoder output is needed). The kept part of
        the padding stays its own sample (positions from 0, loss_mask 0), so no real sample's
        attention, loss or gradient changes; an emptied padding sample is dropped."""
        pad = int(self.metadata.get("padding_tokens") or 0)
        t = self.num_tokens
        last = int(self.cu_seqlens[-1] - self.cu_seqlens[-2]) if self.cu_seqlens.numel() > 1 else 0
        if pad <= 0 or pad > last:  # no padding, or it is not one final sample: leave as is
            return self
        used = t - pad
        keep = -(-used // multiple) * multiple
        if keep >= t:
            return self
        cu = self.cu_seqlens[:-1] if keep == used else self.cu_seqlens.clone()
        if keep != used:
            cu[-1] = keep
        mask = None if self.modality_mask is None else self.modality_mask[:keep]
        return dataclasses.replace(
            self,
            tokens=self.tokens[:keep],
            labels=self.labels[:keep],
            loss_mask=self.loss_mask[:keep],
            position_ids=self.position_ids[:keep],
            cu_seqlens=cu,
            modality_mask=mask,
            metadata=self._trimmed_metadata(keep - used, len(self.cu_seqlens) - 2),
            pack_meta=None if self.pack_meta is None else self.pack_meta.trimmed(keep),
        )

    def _trimmed_metadata(self, pad: int, last_segment: int) -> dict:
        """Metadata after trim_padding: the trailing padding's new size, and the padding
        segment list (concatenated packs) without the last segment once it is emptied."""
        meta = {**self.metadata, "padding_tokens": pad}
        if "padding_segments" in meta and not pad:
            meta["padding_segments"] = [i for i in meta["padding_segments"] if i != last_segment]
        return meta

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of NaViLModel.forward."""
        return dict(
            tokens=self.tokens,
            position_ids=self.position_ids,
            cu_seqlens=self.cu_seqlens,
            labels=self.labels,
            loss_mask=self.loss_mask,
            pixel_values=self.pixel_values,
            grid_thw=self.grid_thw,
            modality_mask=self.modality_mask,
            pack_meta=self.pack_meta,
        )

    def validate(self, cfg: NaViLModelConfig) -> None:
        check_packed_sequence(cfg, self.tokens, self.position_ids, self.cu_seqlens)
        for name in ("labels", "loss_mask"):
            if getattr(self, name).shape != self.tokens.shape:
                raise ValueError(
                    f"{name} has shape {tuple(getattr(self, name).shape)}, tokens "
                    f"{tuple(self.tokens.shape)}"
                )


def check_packed_shapes(
    cfg: NaViLModelConfig,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
) -> None:
    """The checks of `check_packed_sequence` that read no tensor value (shapes and sizes)."""
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one packed sequence [T], got shape {tuple(tokens.shape)}")
    t = tokens.numel()
    if t > cfg.llm.max_sequence_length:
        raise ValueError(
            f"packed sequence has {t} tokens, more than llm.max_sequence_length = "
            f"{cfg.llm.max_sequence_length}; lower --seq-length or raise max_sequence_length"
        )
    if position_ids.shape != tokens.shape:
        raise ValueError(
            f"position_ids {tuple(position_ids.shape)} != tokens {tuple(tokens.shape)}"
        )
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be [n_samples + 1], got {tuple(cu_seqlens.shape)}")


def check_packed_sequence(
    cfg: NaViLModelConfig,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
) -> None:
    """Clear errors for a packed sequence the model cannot take (reads the values: host syncs
    on a GPU; the loader runs it on the CPU when it builds the pack's metadata)."""
    check_packed_shapes(cfg, tokens, position_ids, cu_seqlens)
    t = tokens.numel()
    if cu_seqlens.ndim != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != t:
        raise ValueError(
            f"cu_seqlens must run from 0 to the {t} packed tokens, got {cu_seqlens.tolist()}"
        )
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
    if int(tokens.max()) >= cfg.llm.vocab_size or int(tokens.min()) < 0:
        raise ValueError(
            f"token ids range {int(tokens.min())}..{int(tokens.max())} outside the model vocab "
            f"0..{cfg.llm.vocab_size - 1}; the tokenizer and model config disagree"
        )


def padding_segments(batch: NaViLBatch) -> list[int]:
    """Indices (into cu_seqlens) of the padding segments: `metadata["padding_segments"]`
    (concatenated packs), else the last segment when `metadata["padding_tokens"]` > 0 (the
    loader's and synthetic packs); a batch without this metadata has no known padding."""
    meta = batch.metadata
    if "padding_segments" in meta:
        return [int(i) for i in meta["padding_segments"]]
    pad = int(meta.get("padding_tokens", 0))
    if not pad:
        return []
    cu = batch.cu_seqlens
    last = int(cu[-1] - cu[-2])
    if last != pad:
        raise ValueError(f"metadata says {pad} padding tokens but the last segment has {last}")
    return [len(cu) - 2]
