"""Shared pytest set-up: the CPU compatibility layer for in-process Megatron use, markers."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped with the reason otherwise)")
    config.addinivalue_line("markers", "distributed: launches real multi-process gloo jobs")


@pytest.fixture(scope="session")
def megatron_single_process():
    """Megatron model-parallel state for a 1-process world (gloo/CPU), shared by unit tests."""
    import torch

    from megatron_navil.config import ParallelConfig
    from megatron_navil.utils import distributed

    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = "0", "1", "0"
    distributed.initialize_model_parallel(ParallelConfig(), seed=1)
    yield
    distributed.destroy()
    assert not torch.distributed.is_initialized()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
