"""Fixtures of the reference-model tests (helpers live in reference_helpers.py)."""

import pytest


@pytest.fixture(params=["debug-internlm2", "debug-qwen3"])
def flavor(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def single_thread():
    """Run each test single-threaded: the matrices are tiny, so intra-op threads only add
    overhead, and on a loaded 2-core machine they made run times swing by 10x. Restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
