"""`CudaHandoff` on the CPU path is a true no-op: no stream, no event, the batch untouched.

Proves: with `device=None` (what the loader builds for `decode_device: cpu`) the hand-off is
inactive, `building()` is a reusable null context that lets errors through, `seal` returns no
event and leaves every tensor of the batch the same object (nothing pinned, nothing copied),
`accept` returns the very batch it was given; and the real CPU loader carries such an inactive
hand-off. What the hand-off does on CUDA (private stream, ready event, record_stream) is tested
in tests/data/test_gpu.py; where the loader calls it, in tests/data/test_prefetch.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_navil.batch import NaViLBatch
from megatron_navil.data.cuda_handoff import CudaHandoff


def _batch() -> NaViLBatch:
    t = torch.arange(8)
    return NaViLBatch(
        tokens=t,
        labels=t.clone(),
        loss_mask=torch.ones(8),
        position_ids=t.clone(),
        cu_seqlens=torch.tensor([0, 8], dtype=torch.int32),
        pixel_values=torch.zeros(4, 768),
        grid_thw=torch.tensor([[1, 2, 2]]),
        modality_mask=t > 3,
        metadata={"keys": ["a"]},
    )


def _tensors(batch: NaViLBatch) -> dict:
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}


def test_cpu_handoff_is_a_no_op():
    h = CudaHandoff(None)
    assert not h.active and h.stream is None and h.device is None
    batch = _batch()
    before = _tensors(batch)
    for _ in range(2):  # reusable, like the loader's once-per-batch use
        with h.building():
            pass
    ready = h.seal(batch)
    assert ready is None
    assert h.accept(batch, ready) is batch
    after = _tensors(batch)
    # the same objects: nothing copied or pinned (pin_memory would have made new tensors)
    assert all(after[k] is v for k, v in before.items())


def test_cpu_handoff_lets_build_errors_through():
    h = CudaHandoff(None)
    with pytest.raises(RuntimeError, match="storage vanished"):
        with h.building():
            raise RuntimeError("storage vanished")


def test_cpu_loader_has_an_inactive_handoff(dataset, make_loader):
    loader = make_loader([dataset.root], prefetch_depth=1)
    assert not loader.handoff.active
    batch = next(loader)
    assert batch.pixel_values is None or not batch.pixel_values.is_cuda
