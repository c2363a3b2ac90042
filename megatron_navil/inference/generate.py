"""Greedy decoding with the Megatron NaViL model (single model-parallel group, no KV cache).

Each new token re-runs the packed forward over the whole prompt + generated text: slow but
exact, and enough to caption an image with the debug model. Generated tokens are text tokens,
so they use the text experts, as in the released decoding code.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_navil.models.navil import NaViLModel


@torch.no_grad()
def greedy_generate(
    model: NaViLModel,
    prompt_ids: Sequence[int],
    *,
    pixel_values: Optional[torch.Tensor] = None,
    grid_thw: Optional[torch.Tensor] = None,
    max_new_tokens: int = 32,
    stop_ids: Sequence[int] = (),
) -> list[int]:
    """Token ids generated after `prompt_ids` (stops at any of `stop_ids`, which is included)."""
    if not (model.pre_process and model.post_process):
        raise ValueError("greedy_generate needs the whole model in one process (PP=1)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = list(prompt_ids)
    out: list[int] = []
    limit = model.cfg.llm.max_sequence_length
    try:
        for _ in range(max_new_tokens):
            if len(ids) >= limit:
                break
            tokens = torch.tensor(ids, device=device)
            positions = torch.arange(len(ids), device=device)
            cu = torch.tensor([0, len(ids)], dtype=torch.int32, device=device)
            logits, rows = model(
                tokens, positions, cu, pixel_values=pixel_values, grid_thw=grid_thw
            )
            assert int(rows[-1]) == len(ids) - 1, "the last position must get logits"
            nxt = int(logits[-1, : model.cfg.llm.vocab_size].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt in stop_ids:
                break
    finally:
        model.train(was_training)
    return out
