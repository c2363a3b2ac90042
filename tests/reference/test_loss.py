"""The text loss: which positions count and the exact normalisation sum(w * ce) / sum(w).

Checked against an explicit per-position loop with math.log-sum-exp in float64 (1e-12): inputs
that are <IMG_CONTEXT>, labels of -100 and loss_mask == 0 are excluded, weights scale each term
and the denominator, and nothing counted gives 0. The logits at excluded positions are set to
garbage to prove they are never read.
"""

import math

import torch

from megatron_navil.reference import IGNORE_INDEX, loss_sums, next_token_loss

CTX = 7


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    t, v = 9, 11
    logits = torch.randn(t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (t,), generator=g)
    input_ids = torch.tensor([1, CTX, CTX, 3, 4, CTX, 5, 6, 2])
    labels[4] = IGNORE_INDEX
    loss_mask = torch.ones(t)
    loss_mask[7] = 0
    weights = torch.rand(t, generator=g, dtype=torch.float64) + 0.5
    return logits, labels, input_ids, loss_mask, weights


def _ce(logits_row, label):
    lse = math.log(sum(math.exp(float(z)) for z in logits_row))
    return lse - float(logits_row[label])


def test_loss_matches_explicit_weighted_mean():
    logits, labels, ids, mask, w = _case()
    counted = [t for t in range(len(ids)) if ids[t] != CTX and labels[t] >= 0 and mask[t] != 0]
    assert counted == [0, 3, 6, 8]
    want = sum(float(w[t]) * _ce(logits[t], labels[t]) for t in counted) / sum(
        float(w[t]) for t in counted
    )
    got = next_token_loss(logits, labels, ids, CTX, mask, w)
    assert abs(float(got) - want) < 1e-12
    unweighted = sum(_ce(logits[t], labels[t]) for t in counted) / len(counted)
    assert abs(float(next_token_loss(logits, labels, ids, CTX, mask)) - unweighted) < 1e-12
    num, den = loss_sums(logits, labels, ids, CTX, mask, w)
    assert abs(float(den) - sum(float(w[t]) for t in counted)) < 1e-12


def test_excluded_positions_are_never_read():
    logits, labels, ids, mask, w = _case(1)
    base = next_token_loss(logits, labels, ids, CTX, mask, w)
    garbage = logits.clone()
    garbage[[1, 2, 4, 5, 7]] = 1e3 * torch.randn(5, logits.shape[1], dtype=torch.float64)
    assert float(next_token_loss(garbage, labels, ids, CTX, mask, w)) == float(base)
    garbage[0, 0] += 5.0  # control: a counted position does matter
    assert abs(float(next_token_loss(garbage, labels, ids, CTX, mask, w)) - float(base)) > 1e-3


def test_nothing_counted_gives_zero_with_graph():
    logits, labels, ids, _, _ = _case(2)
    logits.requires_grad_(True)
    loss = next_token_loss(logits, labels, torch.full_like(ids, CTX), CTX)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert not logits.grad.any()
