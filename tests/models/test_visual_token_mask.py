"""The one visual-token mask (NaViLModelConfig.visual_token_mask), used by the loader, the
Megatron model and the FLOP count, marks exactly the tokens the plain-PyTorch reference routes
to the visual experts, on torch tensors and numpy arrays, for every special token and text.
Exact: boolean masks."""

import numpy as np
import torch

from megatron_navil.config import SPECIAL_TOKENS, get_flavor
from megatron_navil.reference import NaViLReference


def test_shared_mask_equals_the_reference_routing():
    cfg = get_flavor("debug-internlm2")
    first = cfg.llm.first_special_token_id
    tokens = torch.cat(
        [
            torch.arange(first + len(SPECIAL_TOKENS)),
            torch.randint(
                0, first + len(SPECIAL_TOKENS), (500,), generator=torch.Generator().manual_seed(0)
            ),
        ]
    )
    want = NaViLReference(cfg).visual_mask(tokens)
    assert want.sum() >= 2 and not want.all()  # <IMG_CONTEXT> and <img> from the arange
    assert torch.equal(cfg.visual_token_mask(tokens), want)
    assert np.array_equal(cfg.visual_token_mask(tokens.numpy()), want.numpy())
