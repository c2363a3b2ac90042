"""TPRegion (models/tp_regions.py), the one helper every TP/SP boundary of the model goes through.

- TP = 2 (a real 2-process gloo job, tests/workers/tp_regions.py): each crossing, with and
  without sequence parallelism, gives exactly (torch.equal) the forward output and the input
  gradient of the plain torch.distributed collective it stands for, on a group the worker made
  itself while Megatron's parallel_state is never initialised (a fallback to the global TP
  group would raise); its vocab-parallel cross entropy equals plain cross entropy on the
  gathered logits (1e-6: the split softmax sums in another order).
- TP = 1 (or no group): every crossing returns its input object and issues no collective.
- The cross entropy over an explicit group is bit-identical to Megatron's
  vocab_parallel_cross_entropy (which reads the global group) at TP = 1, loss and gradient,
  and its sync-free predicted-logits step (masked_fill instead of boolean-mask assignment) is
  bit-identical to Megatron's step on a vocab slice that leaves some targets out.
- The language model's vocab-parallel embedding (masked_fill instead of boolean-mask
  assignment: no host sync) equals Megatron's bit for bit at TP = 2, output and weight gradient
  (in the TP = 2 worker).
Where to look on failure: megatron_navil/models/tp_regions.py.
"""

import glob
import json

import pytest
import torch
from megatron.core import tensor_parallel

from megatron_navil.models.tp_regions import TPRegion
from tests.launcher import launch


class _Cfg:
    def __init__(self, sequence_parallel: bool):
        self.sequence_parallel = sequence_parallel


@pytest.mark.distributed
def test_tp2_crossings_match_plain_collectives(tmp_path):
    out = tmp_path / "regions"
    launch("tests.workers.tp_regions", 2, ["--out", str(out)])
    ranks = [json.load(open(f)) for f in sorted(glob.glob(f"{out}.rank*.json"))]
    assert [r["checked"] for r in ranks] == [
        ["sp=False", "sp=True", "cross_entropy", "embedding"]
    ] * 2


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_one_tp_rank_is_the_identity_without_collectives(monkeypatch, sequence_parallel):
    def refuse(*args, **kwargs):
        raise AssertionError("a TP=1 region issued a collective")

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
        monkeypatch.setattr(torch.distributed, name, refuse)
    region = TPRegion.of(_Cfg(sequence_parallel), None)
    assert not region.sequence_parallel and region.size == 1 and region.sequence_chunk == (1, 0)
    x = torch.randn(4, 1, 6)
    for crossing in (
        region.enter_column,
        region.exit_row,
        region.all_reduce,
        region.split_last_dim,
        region.gather_last_dim,
        region.scatter_sequence,
        region.gather_sequence,
    ):
        assert crossing(x) is x, crossing.__name__


def test_cross_entropy_is_megatrons_at_one_tp_rank(megatron_single_process):
    from megatron.core import parallel_state

    region = TPRegion.of(_Cfg(False), parallel_state.get_tensor_model_parallel_group())
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 1, 11, generator=g)
    target = torch.randint(0, 11, (7, 1), generator=g)
    grads = []
    losses = []
    for fn in (region.cross_entropy, tensor_parallel.vocab_parallel_cross_entropy):
        x = logits.clone().requires_grad_(True)
        # both modify their input in place (Megatron's steps): give each its own copy
        loss = fn(x * 1.0, target)
        (loss * torch.arange(1.0, 8.0)[:, None]).sum().backward()
        losses.append(loss.detach())
        grads.append(x.grad)
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])


def test_predicted_logits_step_is_megatrons_on_a_vocab_slice():
    """Targets outside this rank's slice [start, end) are the masked case TP = 1 never hits."""
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    from megatron_navil.models.tp_regions import _predicted_logits

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 1, 6, generator=g)
    target = torch.randint(0, 18, (9, 1), generator=g)  # slice 6..12 of an 18-column vocab
    logits_max = logits.max(dim=-1)[0]
    ours = _predicted_logits(logits.clone(), target, logits_max, 6, 12)
    megatron = VocabParallelCrossEntropy.calculate_predicted_logits(
        logits.clone(), target, logits_max, 6, 12
    )
    assert bool(ours[0].any()) and not bool(ours[0].all())  # both cases present
    for a, b in zip(ours, megatron):
        assert a.dtype == b.dtype and torch.equal(a, b)
