"""The GPU (`mixed`) decode path: nvJPEG/HW decode + GPU resize, pixel values on the device, and
the race-free hand-off of GPU-built batches from the prefetch thread to the training stream.

Runs only on a CUDA machine (skipped elsewhere with "needs CUDA"). Proves:
- the GPU decoder gives the same patches as the CPU decoder (same pipeline on CPU operators) up
  to decoder/resampler rounding: nvJPEG and libjpeg-turbo may round IDCT/chroma upsampling
  differently (the data_tools tests allow 1 level mean for decode alone) and GPU resize rounds
  like the CPU one, so we allow mean <= 1 level and max <= 24 levels (8-bit levels; 1 level =
  2/255 after normalisation), and exactly -1 in the padding;
- a loader with decode_device gpu yields pixel_values on the GPU (everything else on the CPU,
  pinned, the pack metadata's tensors too) that satisfy the batch contract; with decode_device
  cpu, data.host_pack_metadata pins the batch and its metadata (off: nothing pinned);
- `CudaHandoff` on CUDA: the build runs on the private stream (not the caller's), the caller's
  stream is restored after it, and `accept` orders the consumer after the producer's work;
- the real loader with prefetch ON (depth 2) while the training (default) stream is kept busy
  with long matmuls between `next()` calls: pixel values read on that busy stream (queued behind
  the matmuls, the batch dropped right after, while the prefetch thread keeps allocating the
  next packs) equal the CPU-decode loader's for the same batches within the tolerance above
  (padding exactly -1). Without `record_stream` the allocator would hand a dropped batch's
  block to the next pack before the busy stream had read it;
- with the producer's stream made slow (long matmuls queued on it before each pack's
  normalisation), pixels read on an idle consumer stream right after `next()` are still the
  finished ones: the consumer waits on the batch's event (without the wait it would read the
  buffer before normalisation wrote it); every pack's GPU work ran on the loader's private
  stream, never on the default stream, and `next()` leaves the trainer's stream current (also
  with prefetch_depth 0, where the build runs in the trainer's thread).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BATCHES = 6
"""Loader batches compared per test (the test dataset has 28 samples: several packs with images
and text-only ones)."""


def _busy(n: int = 30, size: int = 4096) -> None:
    """Queue roughly 50-100 ms of fp32 matmuls on the current stream (returns at once)."""
    a = torch.randn(size, size, device="cuda")
    out = torch.empty_like(a)
    for _ in range(n):
        torch.matmul(a, a, out=out)


def _assert_close_to_cpu(got: torch.Tensor, ref: torch.Tensor, pad: torch.Tensor) -> None:
    assert got.shape == ref.shape == pad.shape and got.dtype == ref.dtype
    err = (got - ref).abs() * 127.5
    assert float(err.mean()) <= 1.0 and float(err.max()) <= 24, (
        float(err.mean()),
        float(err.max()),
    )
    assert bool((got[pad] == -1).all())


def _reference_loader(make_loader, root):
    """The CPU-decode loader (built synchronously) and, per `next()`, the padding mask of its
    batch's pixel rows (from the ImageJobs its decoder was given, scales in order)."""
    from tests.data.test_decode import padding_mask

    cpu = make_loader([root], decode_device="cpu", prefetch_depth=0)
    jobs: list = []
    real = cpu.builder.decoder.decode

    def decode(js):
        jobs.extend(js)
        return real(js)

    cpu.builder.decoder.decode = decode

    def next_with_padding():
        jobs.clear()
        batch = next(cpu)
        assert batch.metadata["skipped_images"] == 0  # else the jobs would not match the rows
        pad = (
            torch.cat([padding_mask(s) for j in jobs for s in j.scales])
            if batch.pixel_values is not None
            else None
        )
        return batch, pad

    return next_with_padding


def test_mixed_decoder_matches_cpu_decoder():
    from megatron_navil.data.decode import DaliImageDecoder, normalize_pixels
    from tests.data.test_decode import _jobs, padding_mask

    jobs = [j for _, j in _jobs(multiscale=True)]
    scales = max(len(j.scales) for j in jobs)
    cpu = DaliImageDecoder(max_batch=8, num_scales=scales, num_threads=2, device="cpu")
    gpu = DaliImageDecoder(max_batch=8, num_scales=scales, num_threads=2, device="gpu")
    for job, a, b in zip(jobs, cpu.decode(jobs), gpu.decode(jobs)):
        for scale, ua, ub in zip(job.scales, a, b):
            assert ub.is_cuda and ub.shape == ua.shape
            sa, sb = normalize_pixels(ua), normalize_pixels(ub)
            err = (sb.cpu() - sa).abs() * 127.5
            assert float(err.mean()) <= 1.0 and float(err.max()) <= 24, float(err.max())
            assert bool((sb.cpu()[padding_mask(scale)] == -1).all())


def test_gpu_loader_keeps_pixels_on_device(dataset, make_loader, cfg):
    loader = make_loader([dataset.root], decode_device="gpu")
    for _ in range(4):
        batch = next(loader)
        batch.validate(cfg)
        assert batch.tokens.is_pinned() and batch.loss_mask.is_pinned()
        if batch.pixel_values is not None:
            assert batch.pixel_values.is_cuda and not batch.tokens.is_cuda
            n = int((batch.grid_thw[:, 1] * batch.grid_thw[:, 2]).sum())
            assert batch.pixel_values.shape == (n, 768)

        meta = batch.pack_meta  # data.host_pack_metadata (on): its tensors are pinned too
        assert meta is not None and meta.image_slots.is_pinned() and meta.loss_rows.is_pinned()


@pytest.mark.parametrize("on", [True, False])
def test_cpu_decode_pins_batches_with_host_pack_metadata(dataset, make_loader, on):
    """CPU decode on a CUDA machine: data.host_pack_metadata pins the batch and its metadata in
    the producer thread (so batch.to(cuda, non_blocking=True) is asynchronous); off: as before,
    pageable tensors and no metadata."""
    loader = make_loader([dataset.root], decode_device="cpu", host_pack_metadata=on)
    for _ in range(3):
        batch = next(loader)
        assert batch.tokens.is_pinned() == on and batch.cu_seqlens.is_pinned() == on
        assert (batch.pack_meta is not None) == on
        if on:
            assert batch.pack_meta.loss_rows.is_pinned()
            if batch.pack_meta.vision is not None:
                assert batch.pack_meta.vision.rope.is_pinned()
            moved = batch.to(torch.cuda.current_device())
            assert moved.pack_meta.image_slots.is_cuda
            assert moved.pack_meta.seqlens == batch.pack_meta.seqlens


def test_handoff_orders_consumer_after_private_stream():
    from megatron_navil.batch import NaViLBatch
    from megatron_navil.data.cuda_handoff import CudaHandoff

    h = CudaHandoff(torch.cuda.current_device())
    consumer = torch.cuda.current_stream()
    t = torch.arange(8)
    with h.building():
        assert torch.cuda.current_stream() == h.stream != consumer
        _busy()  # the producer's stream is still busy when the consumer takes the batch
        x = torch.full((1 << 20,), 7.0, device="cuda")
    assert torch.cuda.current_stream() == consumer
    batch = NaViLBatch(
        tokens=t,
        labels=t.clone(),
        loss_mask=torch.ones(8),
        position_ids=t.clone(),
        cu_seqlens=torch.tensor([0, 8], dtype=torch.int32),
        pixel_values=x,
    )
    ready = h.seal(batch)
    assert ready is not None and batch.tokens.is_pinned()
    assert h.accept(batch, ready) is batch
    assert bool((batch.pixel_values.clone() == 7).all())  # queued after the event on `consumer`


def test_prefetched_mixed_decode_matches_cpu_while_training_stream_busy(dataset, make_loader):
    gpu = make_loader([dataset.root], decode_device="gpu", prefetch_depth=2)
    ref_next = _reference_loader(make_loader, dataset.root)
    default = torch.cuda.default_stream()
    assert torch.cuda.current_stream() == default  # the trainer's stream: busy below
    taken = []
    for _ in range(BATCHES):
        _busy()  # "training kernels" queued between next() calls
        batch = next(gpu)
        assert torch.cuda.current_stream() == default
        # read on the busy stream, queued behind the matmuls; then drop the batch at once, so
        # its block would be free for the prefetch thread's next pack without record_stream
        snap = None if batch.pixel_values is None else batch.pixel_values.clone()
        taken.append((batch.metadata["keys"], snap))
        del batch
    torch.cuda.synchronize()
    n_images = 0
    for keys, snap in taken:
        ref, pad = ref_next()
        assert ref.metadata["keys"] == keys
        assert (snap is None) == (ref.pixel_values is None)
        if snap is not None:
            n_images += 1
            _assert_close_to_cpu(snap.cpu(), ref.pixel_values, pad)
    assert n_images >= 2


@pytest.mark.parametrize("depth", [2, 0])
def test_consumer_waits_for_slow_producer_stream(dataset, make_loader, monkeypatch, depth):
    import megatron_navil.data.builder as builder_mod

    real = builder_mod.normalize_pixels
    streams = []

    def slow_normalize(patches, dtype=torch.float32):
        if patches.is_cuda:  # the GPU loader's packs (the CPU reference runs as usual)
            streams.append(torch.cuda.current_stream(patches.device))
            _busy()  # the pack's pixels are written only after these, on the producer's stream
        return real(patches, dtype)

    monkeypatch.setattr(builder_mod, "normalize_pixels", slow_normalize)
    gpu = make_loader([dataset.root], decode_device="gpu", prefetch_depth=depth)
    ref_next = _reference_loader(make_loader, dataset.root)
    default = torch.cuda.default_stream()
    n_images = 0
    for _ in range(BATCHES):
        batch = next(gpu)
        assert torch.cuda.current_stream() == default
        # read at once on the idle trainer's stream: correct only if it waits on the event
        snap = None if batch.pixel_values is None else batch.pixel_values.clone()
        ref, pad = ref_next()
        assert ref.metadata["keys"] == batch.metadata["keys"]
        assert (snap is None) == (ref.pixel_values is None)
        if snap is not None:
            n_images += 1
            _assert_close_to_cpu(snap.cpu(), ref.pixel_values, pad)
    assert n_images >= 2
    assert streams and all(s == gpu.handoff.stream and s != default for s in streams)
