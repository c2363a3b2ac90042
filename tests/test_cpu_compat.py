"""The CPU compatibility layer is inert on a GPU machine, fully reversible, and its lifetime is
explicit.

On a machine that reports CUDA, activate() must not patch anything (GPU behaviour never
changes). On CPU it patches exactly the documented points, and deactivate() restores every
original object (identity checked).
Lifetime: `utils.distributed.destroy()` turns it off; every test starts with it on again (the
fixture in tests/conftest.py: a test once failed with "Torch not compiled with CUDA enabled"
after an earlier test's destroy); the entry points (navil-pretrain, navil-caption, navil-demo),
`initialize_model_parallel` and navil-convert's one-process world turn it on before anything
of Megatron runs. The CPU-only settings of the TransformerConfig follow `needed()`, the one
condition, and the files holding CPU-only deviations test nothing else.
Where to look on failure: megatron_navil/utils/cpu_compat.py, utils/distributed.py.
"""

import os
from pathlib import Path

import pytest
import torch

from megatron_navil.utils import cpu_compat


def _snapshot():
    import megatron.core.tensor_parallel.random as mrandom

    return {
        "current_device": torch.cuda.current_device,
        "Stream": torch.cuda.Stream,
        "a2a": torch.distributed.all_to_all_single,
        "all_gather": torch.distributed.all_gather,
        "rng": mrandom._get_cuda_rng_state,
    }


def test_inert_when_cuda_is_present(monkeypatch):
    was_active = cpu_compat.is_active()
    cpu_compat.deactivate()
    before = _snapshot()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.activate() is False
    assert not cpu_compat.is_active()
    assert _snapshot() == before
    monkeypatch.undo()
    if was_active:
        cpu_compat.activate()


def test_activate_then_deactivate_restores_everything():
    was_active = cpu_compat.is_active()
    cpu_compat.deactivate()
    before = _snapshot()
    assert cpu_compat.activate() is True
    assert torch.cuda.current_device() == torch.device("cpu")
    t = torch.zeros(2, device="cuda")  # mapped to CPU by the function mode
    assert t.device.type == "cpu" and t.cuda() is t
    cpu_compat.deactivate()
    assert _snapshot() == before
    if was_active:
        cpu_compat.activate()


# ----------------------------------------------------------------------------- lifetime


def test_destroy_turns_the_layer_off(monkeypatch):
    from megatron.core import parallel_state

    from megatron_navil.utils import distributed

    cpu_compat.activate()
    # No world is torn down here (the session's may exist): only the layer's part of destroy().
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    distributed.destroy()
    assert not cpu_compat.is_active()
    cpu_compat.activate()


def test_every_test_starts_with_the_layer_on():
    """Runs after the test above turned it off: tests/conftest.py turns it on before each test,
    so Megatron's RNG tracker (the CUDA call that once failed here) works whatever ran before."""
    from megatron.core.tensor_parallel import random as mrandom

    assert cpu_compat.is_active()
    assert torch.equal(mrandom._get_cuda_rng_state(), torch.get_rng_state())


class _Stop(Exception):
    pass


def _layer_state_when(monkeypatch, module, name: str) -> list[bool]:
    """Replace module.name by a stub recording whether the layer was on when it was called."""
    seen = []

    def stub(*args, **kwargs):
        seen.append(cpu_compat.is_active())
        raise _Stop

    monkeypatch.setattr(module, name, stub)
    return seen


@pytest.mark.parametrize("script", ["pretrain", "caption", "demo"])
def test_entry_points_turn_the_layer_on(monkeypatch, script):
    import importlib

    from megatron_navil.utils import cli

    main = importlib.import_module(f"megatron_navil.cli.{script}").main
    seen = _layer_state_when(monkeypatch, cli, "run_cli")
    cpu_compat.deactivate()
    with pytest.raises(_Stop):
        main([])
    assert seen == [True]


def test_megatron_setup_turns_the_layer_on(monkeypatch):
    """initialize_model_parallel (every path that builds Megatron's groups) and navil-convert's
    one-process world turn the layer on before anything of Megatron runs."""
    from megatron_navil.config import ParallelConfig
    from megatron_navil.conversion import layout
    from megatron_navil.utils import distributed

    seen = _layer_state_when(monkeypatch, distributed, "init_process_group")
    cpu_compat.deactivate()
    with pytest.raises(_Stop):
        distributed.initialize_model_parallel(ParallelConfig())
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(layout, "_OWNED", {"world": False})
    monkeypatch.setattr(os, "environ", dict(os.environ))  # it sets RANK, MASTER_PORT, ...
    cpu_compat.deactivate()
    with pytest.raises(_Stop):
        layout.ensure_single_process_world()
    assert seen == [True, True]


@pytest.mark.parametrize("cpu", [True, False])
def test_cpu_only_settings_follow_the_one_condition(monkeypatch, cpu):
    """use_cpu_initialization and unbatched p2p (gloo) are on exactly when `needed()`; the layer
    itself refuses to activate when it is not needed."""
    from megatron_navil.config import ParallelConfig, PrecisionConfig
    from megatron_navil.models import transformer_config

    monkeypatch.setattr(cpu_compat, "needed", lambda: cpu)
    kw = transformer_config._common(ParallelConfig(), PrecisionConfig(), "local")
    assert kw["use_cpu_initialization"] is cpu and kw["batch_p2p_comm"] is not cpu
    if not cpu:
        was_active = cpu_compat.is_active()
        cpu_compat.deactivate()
        assert cpu_compat.activate() is False and not cpu_compat.is_active()
        monkeypatch.undo()
        if was_active:
            cpu_compat.activate()


def test_cpu_only_deviations_ask_the_condition_not_cuda():
    """The files holding CPU-only deviations never test CUDA themselves (only needed() does)."""
    root = Path(__file__).resolve().parents[1] / "megatron_navil"
    for rel in ("models/transformer_config.py", "utils/distributed.py"):
        assert "cuda.is_available" not in (root / rel).read_text(), rel
    source = (root / "utils/cpu_compat.py").read_text()
    assert source.count("cuda.is_available()") == 1  # in needed()
