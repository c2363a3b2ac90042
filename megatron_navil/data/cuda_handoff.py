"""Race-free hand-off of GPU-built batches from the loader's producer to the training stream.

With `decode_device: gpu` the producer (the prefetch thread, or the trainer's thread with
`prefetch_depth: 0`) makes `pixel_values` on the GPU: it allocates the patch buffers, DALI copies
its outputs into them, torch concatenates and normalises them. `CudaHandoff` makes that safe and
keeps it off the training stream:

- producer side, `with handoff.building(): batch = builder.build(pack)`: every torch GPU op of the
  build (allocation, DALI's copy, cat, normalisation) is queued on a private CUDA stream of the
  loader, on the loader's device. A thread's current stream is otherwise the device's default
  stream, which training uses too, so decode work would queue behind (and delay) the training
  kernels instead of overlapping them. The private stream comes from torch's pool, created
  `cudaStreamNonBlocking`, so it does not implicitly synchronise with the legacy default stream.
  The device is entered too: a new thread's current device is 0 whatever `set_device` the rank
  did, and an op without an explicit device would touch (and create a context on) GPU 0.
- `ready = handoff.seal(batch)` after the build's last GPU op: pins the batch's CPU tensors (so
  the trainer's `batch.to(device, non_blocking=True)` is a real asynchronous copy: from pageable
  memory the driver stages the copy and returns only when it is done, and may first wait for
  the work queued on the stream, stalling the trainer's host thread behind the GPU) and records
  a CUDA event on the private stream.
- consumer side, `batch = handoff.accept(batch, ready)` in the trainer's thread (the loader's
  `__next__`): the consumer's current stream waits for the event (so the training kernels read
  finished pixels), and every CUDA tensor of the batch gets `record_stream(consumer)`: the
  caching allocator otherwise gives a dead tensor's block straight back to the stream it was
  allocated on (the private one), which is safe only for work ordered on that stream, so the
  next pack's decode could overwrite it while training kernels queued on the consumer stream
  have yet to read it.

On the CPU path (`device=None`) there is no stream and no event: `building()` is a null context,
`seal` returns None and `accept` returns the batch unchanged. With `pin_device` (CPU decode on a
CUDA machine, data.host_pack_metadata on) `seal` still pins the batch's CPU tensors and its
pack metadata in the producer thread, for the same asynchronous copy; without it the CPU loader
does no extra work.
"""

from __future__ import annotations

import contextlib
import dataclasses
from contextlib import AbstractContextManager
from typing import Optional

import torch

from megatron_navil.batch import NaViLBatch

_NULL_CONTEXT = contextlib.nullcontext()
"""Reused by the CPU path: entering it costs nothing and it holds no state."""


def _tensors(batch: NaViLBatch) -> list[torch.Tensor]:
    return [
        v
        for v in (getattr(batch, f.name) for f in dataclasses.fields(batch))
        if isinstance(v, torch.Tensor)
    ]


def _pin(batch: NaViLBatch, device: torch.device) -> None:
    """Replace the batch's CPU tensors (its pack metadata's too) by page-locked copies."""
    with torch.cuda.device(device):  # pinned memory is allocated through this device
        for f in dataclasses.fields(batch):
            v = getattr(batch, f.name)
            if isinstance(v, torch.Tensor) and v.device.type == "cpu" and not v.is_pinned():
                setattr(batch, f.name, v.pin_memory())
        if batch.pack_meta is not None:
            batch.pack_meta = batch.pack_meta.pin_memory()


class CudaHandoff:
    """Producer stream + ready event + consumer-stream bookkeeping for one loader's batches.

    `device`: the CUDA device index the batches' GPU tensors live on (the decoder's), or None
    for the CPU path (then every method is a no-op, except pinning for `pin_device`).
    `pin_device`: CPU path only: the CUDA device (the trainer's) to pin batches for, or None."""

    def __init__(self, device: Optional[int], pin_device: Optional[int] = None):
        self.device: Optional[torch.device] = None
        self.stream: Optional[torch.cuda.Stream] = None
        self.pin_device = pin_device
        if device is not None:
            self.device = torch.device("cuda", device)
            self.stream = torch.cuda.Stream(device=self.device)

    @property
    def active(self) -> bool:
        return self.stream is not None

    def building(self) -> AbstractContextManager:
        """Context for the producer's build: the loader's device and private stream (CPU: none).

        A new context per call (`torch.cuda.stream` contexts are not reusable); the current
        stream is per thread in torch, so this never changes the trainer's stream."""
        if self.stream is None:
            return _NULL_CONTEXT
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def seal(self, batch: NaViLBatch) -> Optional[torch.cuda.Event]:
        """After the build's last GPU op (producer side): replace the batch's CPU tensors by
        pinned copies and return an event recorded on the private stream. CPU path: None, the
        batch untouched."""
        if self.stream is None:
            if self.pin_device is not None:
                _pin(batch, torch.device("cuda", self.pin_device))
            return None
        _pin(batch, self.device)
        ready = torch.cuda.Event()  # no timing: the cheapest event to record and wait on
        ready.record(self.stream)
        return ready

    def accept(self, batch: NaViLBatch, ready: Optional[torch.cuda.Event]) -> NaViLBatch:
        """Consumer side (the thread that trains): order its current stream after `ready` and
        tie the batch's CUDA tensors to that stream in the allocator. Returns the same batch
        object. CPU path (or `ready` None): the batch unchanged."""
        if self.stream is None or ready is None:
            return batch
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(ready)  # a GPU-side wait: the host does not block
        for t in _tensors(batch):
            if t.is_cuda:
                t.record_stream(consumer)
        return batch
