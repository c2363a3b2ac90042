"""The backward rule of the FLOP count: which GEMMs of a forward pass need a backward, and how much.

A model part is a list of `Op`s in data-flow order; modality experts are `Branches` (chains that
read the same input and are merged after). `walk` goes through them once, carrying one bit,
`flows`: does the current activation depend on a trained weight that touched this micro-batch
(i.e. does autograd need its gradient)? Per op, with F its forward FLOPs:

- a GEMM X @ W:  backward = F (dgrad, dX) if `flows` before it
                          + F (wgrad, dW) if W's part trains;
  a trained W that saw at least one row makes `flows` true after it;
- a weightless GEMM (attention QK^T and AV): backward = 2 F if `flows` (dQ, dK from dS; dV, dP);
- a norm is an op of 0 FLOPs whose (trained) weight still starts a gradient.

The residual stream only ORs gradients together, so the single bit is exact for pre-norm blocks.
This is what autograd does at tensor granularity: a frozen module with nothing trained upstream
(a frozen ViT at the input) does no backward at all; a frozen LLM under a trained ViT computes
dgrad but never wgrad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union


@dataclass(frozen=True)
class FlopCount:
    """Forward and backward FLOPs of some part of a step."""

    forward: float = 0.0
    """Forward matmul FLOPs (2 per multiply-add)."""
    backward: float = 0.0
    """Backward matmul FLOPs under the rule of this module's docstring."""

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.forward + other.forward, self.backward + other.backward)

    def times(self, k: float) -> "FlopCount":
        return FlopCount(k * self.forward, k * self.backward)


@dataclass(frozen=True)
class Op:
    """One GEMM (or a norm) of the forward pass."""

    flops: float
    """Forward FLOPs."""
    part: Optional[str]
    """Stage part owning the weight (config/training.PARTS); None = no weight (QK^T, AV)."""
    rows: float
    """Rows it processes: a trained weight that saw no row (an absent modality) starts no
    gradient, because no model work depends on it."""


@dataclass(frozen=True)
class Branches:
    """Chains that read the same input (the text and the visual expert of one projection or
    FFN); their outputs are merged, so after them `flows` is the OR of the chains'."""

    chains: tuple[tuple["Node", ...], ...]


Node = Union[Op, Branches]


def _op(op: Op, trained: frozenset, flows: bool) -> tuple[FlopCount, bool]:
    if op.part is None:  # QK^T / AV: dS -> dQ, dK and dO -> dV, dP only when q, k, v need grad
        return FlopCount(op.flops, 2 * op.flops if flows else 0.0), flows
    trains = op.part in trained
    backward = op.flops * (float(flows) + float(trains))  # dgrad + wgrad
    return FlopCount(op.flops, backward), flows or (trains and op.rows > 0)


def walk(
    chain: tuple[Node, ...] | list[Node], trained: frozenset, flows: bool
) -> tuple[FlopCount, bool]:
    """FLOPs of a chain whose input needs a gradient iff `flows`; returns (count, flows after)."""
    total = FlopCount()
    for node in chain:
        if isinstance(node, Op):
            count, flows = _op(node, trained, flows)
            total = total + count
            continue
        after = flows
        for sub in node.chains:
            count, out = walk(sub, trained, flows)
            total, after = total + count, after or out
        flows = after
    return total, flows
