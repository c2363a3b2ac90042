"""Next-token cross-entropy on text, with optional per-token weights.

Normalisation (exact): with ce[t] = CE(logits[t], labels[t]) and the counted mask
  counted[t] = input_ids[t] != <IMG_CONTEXT>  and  labels[t] >= 0 (-100 = ignore)
               and loss_mask[t] != 0 (when given),
  w[t] = weights[t] (1 when not given) * counted[t],
  loss = sum_t w[t] * ce[t] / sum_t w[t]      (0 when nothing is counted).
Without weights this is the mean CE over counted tokens. Labels are already shifted by the
caller: labels[t] is the token that should follow position t.

Data-parallel training normalises by the weight sum over *all* ranks; `loss_sums` returns the
numerator and denominator separately so a trainer (or a test) can all-reduce the denominator.
The released code's weighted branch divides by the sum of all weights, including positions whose
label is ignored; we mask the weights by `counted` first, which equals the release whenever the
data pipeline gives ignored positions weight 0 (it has no reason not to).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    input_ids: torch.Tensor,
    img_context_id: int,
    loss_mask: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t w[t] * ce[t], sum_t w[t]) over the counted tokens: float32 (float64) scalars."""
    if not (logits.shape[:-1] == labels.shape == input_ids.shape):
        raise ValueError(
            f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and input_ids "
            f"{tuple(input_ids.shape)} must agree on the token dimension(s)"
        )
    counted = (input_ids != img_context_id) & (labels >= 0)
    if loss_mask is not None:
        counted = counted & (loss_mask != 0)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    w = counted.to(dtype) if weights is None else weights.to(dtype) * counted
    # Ignored labels are clamped to a valid id so the CE is defined; their weight is 0.
    flat = logits.to(dtype).reshape(-1, logits.shape[-1])  # [T, V]
    ce = F.cross_entropy(flat, labels.clamp(min=0).reshape(-1), reduction="none")
    return (ce * w.reshape(-1)).sum(), w.sum()


def next_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    input_ids: torch.Tensor,
    img_context_id: int,
    loss_mask: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """sum(w * ce) / sum(w) over counted tokens (see the module docstring); 0 if none counted."""
    num, den = loss_sums(logits, labels, input_ids, img_context_id, loss_mask, weights)
    if den.item() == 0:
        return num * 0.0  # keeps the graph (all terms are weighted by 0)
    return num / den
