"""navil-pretrain under a multi-rank launch reports an error every rank shares once, from rank 0,
in one line without a traceback, and every rank exits with status 2:
- a usage error (an unknown flag: argparse's own message, as a ConfigError);
- a layout that does not divide the world size (TP=4 on 2 processes), found after the process
  group is up.
Where to look on failure: megatron_navil/cli/pretrain.py (_report), cli/args.py (_Parser),
utils/distributed.py (initialize_model_parallel).
"""

import pytest

from tests.launcher import run_ranks
from tests.training.test_pretrain import BASE

pytestmark = pytest.mark.distributed


def _check(results, needle: str) -> None:
    outputs = [out for _, out in results]
    assert [rc for rc, _ in results] == [2, 2], outputs
    lines = [line for out in outputs for line in out.splitlines() if needle in line]
    assert len(lines) == 1 and "[rank" not in lines[0], outputs
    assert needle in outputs[0] and not any("Traceback" in out for out in outputs), outputs


def test_usage_error_is_reported_once():
    _check(
        run_ranks("megatron_navil.cli.pretrain", 2, BASE + ["--no-such-flag"], timeout=120),
        "unrecognized arguments: --no-such-flag",
    )


def test_layout_that_does_not_divide_the_world_is_one_line():
    _check(
        run_ranks(
            "megatron_navil.cli.pretrain",
            2,
            BASE + ["--train-iters", "2", "--tensor-model-parallel-size", "4"],
            timeout=300,
        ),
        "world size 2 is not divisible by TP x PP = 4",
    )
