"""The CPU compatibility layer is inert on a GPU machine and fully reversible.

On a machine that reports CUDA, activate() must not patch anything (GPU behaviour never
changes). On CPU it patches exactly the documented points, and deactivate() restores every
original object (identity checked)."""

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
