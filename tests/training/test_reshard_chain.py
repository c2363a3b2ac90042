"""Model AND optimizer state reshard across every parallel axis, in both directions.

One run of the debug model is carried through a chain of layouts, each resuming the previous
one's checkpoint with the same command plus new parallel flags:

    1 process (distributed optimizer)         steps 1-2
 -> EP=2 x DP=2 (2 processes)                 step 3
 -> TP=2 + SP x PP=2 (4 processes), plain optimizer   step 4
 -> 1 process (distributed optimizer)         steps 5-6

Every axis changes up and down once: TP 1->2->1, PP 1->2->1, EP 1->2->1, DP 1->2->1, sequence
parallel off->on->off, distributed optimizer on->off->on. Each step's loss must equal the
uninterrupted single-process run's (1e-5 relative: only the floating-point summation order
differs between layouts; a lost or misplaced Adam moment or step count moves the next loss by
far more). The loss of step k+1 depends on the optimizer update of step k, so the optimizer
state loaded at each reshard is checked by the step after it.

Before the fix this fails at the first hop (EP 1 -> 2): Megatron chains a second optimizer for
expert parameters at EP > 1 and the state was keyed per chain.
Where to look: megatron_navil/checkpoint/optimizer_keys.py, training/optimizer_state.py.
"""

import pytest

from tests.training.runner import losses, pretrain
from tests.training.test_pretrain import BASE

pytestmark = [pytest.mark.processes, pytest.mark.distributed]

CHAIN = [
    # (processes, parallel flags, train until step)
    (1, [], 2),
    (2, ["--expert-model-parallel-size", "2"], 3),
    (
        4,
        [
            "--tensor-model-parallel-size",
            "2",
            "--sequence-parallel",
            "--pipeline-model-parallel-size",
            "2",
            "optimizer.use_distributed_optimizer=false",
        ],
        4,
    ),
    (1, [], 6),
]


def test_chain_of_layouts_continues_the_uninterrupted_losses(tmp_path):
    full = tmp_path / "full.jsonl"
    # One LR schedule for all runs (its length would otherwise follow each run's --train-iters).
    base = BASE + ["--lr-decay-iters", "6"]
    pretrain(1, base + ["--train-iters", "6", "--metrics-file", str(full)])
    want = losses(full)

    ck, m = tmp_path / "ck", tmp_path / "chain.jsonl"
    for world, flags, until in CHAIN:
        args = ["--train-iters", str(until), "--save", str(ck), "--metrics-file", str(m)]
        pretrain(world, base + args + flags)
    got = losses(m)  # later lines of the same step overwrite earlier ones (none expected)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])
