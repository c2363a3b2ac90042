"""Named tensor transforms between the HF release layout and Megatron's canonical layout, and
the tensor-parallel split each Megatron parameter gets.

Megatron's canonical layout is the TP=1/PP=1/EP=1 local-backend state dict. Each transform maps
a list of HF tensors (in the order the mapping names them) to one Megatron tensor and back;
`to_hf(to_megatron(x)) == x` exactly (pure reshapes, concatenations, padding).

`TPSplit` says how a canonical tensor is cut over TP ranks (which axis, in how many
independently split blocks, in units of how many rows). Checkpoints never need it (the torch_dist
format stores global tensors and Megatron reshards on load), but it is what decides whether a
requested layout can hold the model (`check`), and `shard` reproduces exactly the local tensor a
TP rank holds (tested against real TP=2 models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_navil.conversion.errors import ConversionError


@dataclass(frozen=True)
class TPSplit:
    """How a canonical Megatron tensor is split over TP ranks."""

    axis: Optional[int] = None
    """Split axis (None: replicated on every TP rank)."""
    blocks: int = 1
    """The axis is made of this many blocks, each split separately (SwiGLU fc1 = [gate; up]:
    rank r holds [gate_r; up_r])."""
    unit: int = 1
    """Rows that must stay on one rank (a head, a KV group's [q_1..q_g, k, v] rows)."""

    def check(self, name: str, shape: tuple, tp: int) -> None:
        if self.axis is None or tp == 1:
            return
        rows = shape[self.axis] // self.blocks
        if rows % (self.unit * tp):
            units = rows // self.unit
            raise ConversionError(
                f"{name}: {units} units of {self.unit} rows (heads, query groups, FFN or vocab "
                f"rows) cannot be split over --tensor-model-parallel-size {tp}; use a TP size "
                f"that divides {units}"
            )

    def shard(self, t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """The slice of canonical tensor `t` that TP rank `rank` of `tp` holds."""
        if self.axis is None or tp == 1:
            return t
        parts = [b.chunk(tp, dim=self.axis)[rank] for b in t.chunk(self.blocks, dim=self.axis)]
        return torch.cat(parts, dim=self.axis)


REPLICATED = TPSplit()


@dataclass(frozen=True)
class Transform:
    """Identity: one HF tensor <-> one Megatron tensor of the same shape."""

    name: str = "identity"

    def to_megatron(self, hf: list[torch.Tensor]) -> torch.Tensor:
        (t,) = hf
        return t

    def to_hf(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t]

    def megatron_shape(self, hf_shapes: list[tuple]) -> tuple:
        (s,) = hf_shapes
        return tuple(s)


@dataclass(frozen=True)
class PatchEmbed(Transform):
    """Conv2d(3, C, P, stride P) weight [C, 3, P, P] <-> Linear weight [C, 3*P*P] (c, ph, pw)."""

    name: str = "patch_embed"
    channels: int = 3
    patch: int = 16

    def to_megatron(self, hf):
        (w,) = hf
        return w.reshape(w.shape[0], -1)

    def to_hf(self, t):
        return [t.reshape(t.shape[0], self.channels, self.patch, self.patch)]

    def megatron_shape(self, hf_shapes):
        (s,) = hf_shapes
        return (s[0], s[1] * s[2] * s[3])


@dataclass(frozen=True)
class HeadInterleave(Transform):
    """ViT fused qkv [q(all heads); k; v] (rows) <-> Megatron [per head: q_h, k_h, v_h].

    Megatron's linear_qkv groups rows per KV group ([q_1..q_g, k, v]); for multi-head attention
    every head is its own group. Works for the weight [3C, C] and the bias [3C].
    """

    name: str = "vit_qkv"
    heads: int = 1

    def to_megatron(self, hf):
        (w,) = hf
        rest = w.shape[1:]
        # [3, H, hd, ...] -> [H, 3, hd, ...]
        return w.reshape(3, self.heads, -1, *rest).transpose(0, 1).reshape(w.shape)

    def to_hf(self, t):
        rest = t.shape[1:]
        return [t.reshape(self.heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)]


@dataclass(frozen=True)
class GroupedQKV(Transform):
    """Separate q [H*hd, D], k [G*hd, D], v [G*hd, D] (Qwen3) <-> Megatron/InternLM2 grouped rows
    [per KV group: q_1..q_g, k, v]."""

    name: str = "grouped_qkv"
    groups: int = 1
    head_dim: int = 128

    def to_megatron(self, hf):
        q, k, v = hf
        d, g, hd = q.shape[1], self.groups, self.head_dim
        blocks = (q.reshape(g, -1, hd, d), k.reshape(g, 1, hd, d), v.reshape(g, 1, hd, d))
        return torch.cat(blocks, dim=1).reshape(-1, d)  # [G * (H/G + 2) * hd, D]

    def to_hf(self, t):
        d, g, hd = t.shape[1], self.groups, self.head_dim
        blocks = t.reshape(g, -1, hd, d)  # [G, H/G + 2, hd, D]
        return [
            blocks[:, :-2].reshape(-1, d),
            blocks[:, -2].reshape(-1, d),
            blocks[:, -1].reshape(-1, d),
        ]

    def megatron_shape(self, hf_shapes):
        q, k, v = hf_shapes
        return (q[0] + k[0] + v[0], q[1])


@dataclass(frozen=True)
class GatedMLP(Transform):
    """gate [F, D], up [F, D] <-> Megatron SwiGLU linear_fc1 [2F, D] = cat(gate, up)."""

    name: str = "gated_mlp"

    def to_megatron(self, hf):
        gate, up = hf
        return torch.cat([gate, up], dim=0)

    def to_hf(self, t):
        gate, up = t.chunk(2, dim=0)
        return [gate, up]

    def megatron_shape(self, hf_shapes):
        g, u = hf_shapes
        return (g[0] + u[0], g[1])


@dataclass(frozen=True)
class PadVocab(Transform):
    """HF [V, D] <-> Megatron [V_padded, D]; padded rows are zeros and never used (their
    logits are masked), and are dropped on the way back."""

    name: str = "pad_vocab"
    vocab: int = 0
    padded: int = 0

    def to_megatron(self, hf):
        (w,) = hf
        if w.shape[0] != self.vocab:
            raise ValueError(
                f"embedding has {w.shape[0]} rows, the config says vocab_size = {self.vocab}"
            )
        return torch.cat([w, w.new_zeros(self.padded - w.shape[0], w.shape[1])])

    def to_hf(self, t):
        return [t[: self.vocab]]

    def megatron_shape(self, hf_shapes):
        (s,) = hf_shapes
        return (self.padded, s[1])
