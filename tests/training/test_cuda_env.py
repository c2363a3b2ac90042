"""CUDA_DEVICE_MAX_CONNECTIONS=1 reaches every GPU job that uses tensor parallelism.

- The launchers (examples/*.sh, examples/*.sbatch, the scaling sweep's generated sbatch) export
  it before starting navil-pretrain, keeping a value the user already set.
- navil-pretrain's start-up decision: with CUDA and TP > 1 an unset variable is set to 1 (before
  the first CUDA context, which reads it), a different value is kept and warned about once
  (rank 0), and nothing is touched on CPU or with TP = 1. The decision is a pure function of
  (TP size, current value, CUDA present), so the GPU branch is tested here on CPU.
Where to look on failure: megatron_navil/utils/cuda_env.py, cli/pretrain.py, examples/.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from megatron_navil.utils.cuda_env import VAR, ensure_max_connections, max_connections_decision

ROOT = Path(__file__).resolve().parents[2]
EXPORT = "export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}"


def _launchers() -> list[Path]:
    found = sorted((ROOT / "examples").glob("*.sh")) + sorted((ROOT / "examples").glob("*.sbatch"))
    return [p for p in found if "navil-pretrain" in p.read_text()]


def test_launchers_export_it_before_navil_pretrain():
    launchers = _launchers()
    assert {p.name for p in launchers} >= {
        "train_single_node.sh",
        "train_multi_node.sh",
        "train_slurm.sbatch",
        "quickstart.sh",
    }
    for path in launchers:
        lines = [s.strip() for s in path.read_text().splitlines()]
        assert EXPORT in lines, path.name
        launch = next(i for i, s in enumerate(lines) if "navil-pretrain" in s and s[:1] != "#")
        assert lines.index(EXPORT) < launch, path.name


def test_scaling_sweep_sbatch_exports_it(tmp_path):
    from megatron_navil.scaling import sweep
    from tests.scaling.test_sweep import _spec

    path = sweep.write_sbatch(str(tmp_path / "grid.json"), _spec(), tmp_path / "out", 2, [])
    lines = path.read_text().splitlines()
    assert EXPORT in lines
    assert lines.index(EXPORT) < next(i for i, s in enumerate(lines) if "navil-scaling sweep" in s)


@pytest.mark.parametrize(
    "tp,current,cuda,want",
    [
        (2, None, True, ("1", None)),
        (2, "", True, ("1", None)),
        (2, "1", True, (None, None)),
        (1, None, True, (None, None)),
        (8, None, False, (None, None)),
    ],
)
def test_decision(tp, current, cuda, want):
    assert max_connections_decision(tp, current, cuda) == want


def test_other_value_is_kept_and_warned_once(caplog):
    env = {VAR: "8"}
    with caplog.at_level(logging.WARNING):
        warning = ensure_max_connections(2, env, cuda=True)
    assert env[VAR] == "8"  # the user's choice
    assert warning is not None and f"export {VAR}=1" in warning
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [warning]


def test_unset_is_set_with_tp_and_left_alone_without_cuda():
    env: dict[str, str] = {}
    assert ensure_max_connections(4, env, cuda=True) is None and env == {VAR: "1"}
    cpu: dict[str, str] = {}
    assert ensure_max_connections(4, cpu, cuda=False) is None and cpu == {}
