"""data.host_pack_metadata: the loader's host-side pack metadata (megatron_navil/pack_meta.py)
changes no number and removes every host sync from the model's forward and backward.

- Parity: batches from the real loader (real shards, tokenizer, DALI CPU decode; images of
  several sizes, text-only packs, padding) go through the training step's `forward_step` twice
  on one debug model, with the loader's `pack_meta` and without it (the model then computes the
  same facts itself). Per-position losses, the counted-token loss and every parameter gradient
  are bit-identical (torch.equal): both runs do the same floating-point ops in the same order on
  the same values; only where the segment lengths, indices and RoPE angles come from differs.
  Inference logits (and their row indices) likewise, also without host syncs. More model
  variants (window attention in both output orders, Qwen3, the blank image of text-only packs)
  run on synthetic packs whose metadata comes from the same PackMeta.build the loader calls.
- Host syncs (utils/host_syncs.py, the calls that would block the host on a GPU): with the
  metadata one micro-batch's forward + backward has none and no pageable host->device copy;
  without it there are several (so this test can fail).
- The switch off: the loader sends the same tensors and no metadata. Metadata that no longer
  matches its batch is refused with a message, not used.
Where to look on failure: megatron_navil/pack_meta.py, models/navil.py (which path is taken),
the site names in the assertion message (file:line of each remaining sync).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
from megatron_navil.data.synthetic import synthetic_batch
from megatron_navil.models.navil import NaViLModel
from megatron_navil.pack_meta import PackMeta
from megatron_navil.training.step import forward_step
from megatron_navil.utils.host_syncs import HostSyncCounter

SEQ = 256


def _step(model, batch, with_meta: bool):
    """One micro-batch of the training step (forward_step: batch.to(device), the model, the
    loss function), then backward. Returns (per-position loss, loss, grads, counter)."""
    b = dataclasses.replace(batch, pack_meta=batch.pack_meta if with_meta else None)
    model.zero_grad(set_to_none=True)
    with HostSyncCounter() as counter:
        per_position, loss_fn = forward_step(iter([b]), model)
        loss_sum, num_tokens, _ = loss_fn(per_position)
        loss = loss_sum / num_tokens
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return per_position.detach(), loss.detach(), grads, counter


def _assert_same_step(model, batch):
    """The parity and sync-count claims of the module docstring, for one batch."""
    assert batch.pack_meta is not None
    on = _step(model, batch, True)
    off = _step(model, batch, False)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    assert torch.isfinite(on[1]) and on[2].keys() == off[2].keys() and len(on[2]) > 10
    for name in on[2]:
        assert torch.equal(on[2][name], off[2][name]), name
    assert on[3].events == [], on[3].by_site()
    assert len(off[3].syncs) >= 3, off[3].by_site()  # grids/segments, visual count, nonzeros
    with torch.no_grad():  # inference: logits at every non-<IMG_CONTEXT> row
        inputs = dict(batch.model_inputs(), labels=None, loss_mask=None)
        with HostSyncCounter() as counter:
            logits_on, rows_on = model(**inputs)
        logits_off, rows_off = model(**dict(inputs, pack_meta=None))
    assert torch.equal(rows_on, rows_off) and torch.equal(logits_on, logits_off)
    assert counter.events == [], counter.by_site()
    return on[3], off[3]


def test_loader_batches_same_numbers_without_host_syncs(
    megatron_single_process, dataset, make_loader, cfg
):
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())
    loader = make_loader([dataset.root], seq_length=SEQ)
    seen_images = 0
    for _ in range(6):
        batch = next(loader)
        seen_images += batch.pixel_values is not None
        _assert_same_step(model, batch)
    assert seen_images >= 2  # the images path, not only text


def test_switch_off_sends_the_same_tensors_without_metadata(dataset, make_loader):
    on = next(make_loader([dataset.root], seq_length=SEQ))
    off = next(make_loader([dataset.root], seq_length=SEQ, host_pack_metadata=False))
    assert on.pack_meta is not None and off.pack_meta is None
    for f in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "grid_thw"):
        a, b = getattr(on, f), getattr(off, f)
        assert (a is None and b is None) or torch.equal(a, b), f
    assert on.pack_meta.seqlens == tuple(torch.diff(on.cu_seqlens).tolist())


VARIANTS = {
    "qwen3_window_released_order": (
        "debug-qwen3",
        {"vision.window_size": 64, "vision.keep_window_order": True},
    ),
    "internlm2_window_row_order": (
        "debug-internlm2",
        {"vision.window_size": 64, "vision.fullatt_block_indexes": [1]},
    ),
    "internlm2_composed_proj": ("debug-internlm2", {"experts.output_proj_mode": "composed"}),
}
SAMPLES = [[3, [(2, 4), (4, 6)], 5], [7], [2, [(8, 4)], 2, [(4, 2)], 3]]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_variants_same_numbers_without_host_syncs(megatron_single_process, name):
    flavor, overrides = VARIANTS[name]
    cfg = get_flavor(flavor).apply_overrides(overrides)
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())
    batch = synthetic_batch(cfg, 160, torch.Generator().manual_seed(1), SAMPLES)
    batch.pack_meta = PackMeta.build(cfg, batch)
    _assert_same_step(model, batch)


def test_blank_image_of_text_only_packs_without_host_syncs(megatron_single_process):
    """Training with vision_every_micro_batch runs the encoder on a blank image for text-only
    packs; with metadata its grid and RoPE angles are made once, not read back each time."""
    cfg = get_flavor("debug-internlm2")
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig(), vision_every_micro_batch=True)
    model.train()
    batch = synthetic_batch(cfg, 64, torch.Generator().manual_seed(2), [[20], [30]])
    batch.pack_meta = PackMeta.build(cfg, batch)
    _step(model, batch, True)  # the first call makes the blank image's metadata
    _assert_same_step(model, batch)
    grads = _step(model, batch, True)[2]
    assert any(n.startswith("vision_model") for n in grads)  # the encoder did run


def test_stale_metadata_is_refused(megatron_single_process):
    cfg = get_flavor("debug-internlm2")
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())
    g = torch.Generator().manual_seed(3)
    batch = synthetic_batch(cfg, 64, g, [[20], [30]])
    other = synthetic_batch(cfg, 64, g, [[10], [10], [30]])
    batch.pack_meta = PackMeta.build(cfg, other)  # 4 segments for a batch of 3
    with pytest.raises(ValueError, match="changed after its metadata was built"):
        model(**batch.model_inputs())


def test_mock_and_joined_packs_follow_the_switch():
    """The trainer's other pack sources: MockPackLoader (--mock-data) attaches metadata when the
    switch is on; concat_packs (micro_batch_size > 1) rebuilds it for the joined pack only when
    every pack had one, and the joined metadata is the packs' metadata laid end to end."""
    from megatron_navil.training.data import MockPackLoader, concat_packs

    cfg = get_flavor("debug-internlm2")
    assert next(MockPackLoader(cfg, 256, 5, 0, 1)).pack_meta is None
    loader = MockPackLoader(cfg, 256, 5, 0, 1, pack_metadata=True)
    a, b = next(loader), next(loader)
    joined = concat_packs([a, b], cfg).pack_meta
    ma, mb = a.pack_meta, b.pack_meta
    assert joined.seqlens == ma.seqlens + mb.seqlens
    assert joined.num_visual == ma.num_visual + mb.num_visual > 0
    t = a.num_tokens
    assert torch.equal(joined.image_slots, torch.cat([ma.image_slots, mb.image_slots + t]))
    assert torch.equal(joined.loss_rows, torch.cat([ma.loss_rows, mb.loss_rows + t]))
    assert joined.vision.grids == ma.vision.grids + (mb.vision.grids if mb.vision else ())
    assert concat_packs([a, dataclasses.replace(b, pack_meta=None)], cfg).pack_meta is None
    assert concat_packs([a, b]).pack_meta is None  # no model config given: the model computes it


def test_switch_is_a_flag_default_on():
    """data.host_pack_metadata: on by default, --no-host-pack-metadata turns it off."""
    import argparse

    from megatron_navil.config.flags import add_flags, flag_values
    from megatron_navil.config.pretrain import PretrainConfig

    parser = argparse.ArgumentParser()
    fields = add_flags(parser, PretrainConfig)
    assert PretrainConfig().data.host_pack_metadata is True
    got = flag_values(parser.parse_args(["--no-host-pack-metadata"]), fields)
    assert got == {"data.host_pack_metadata": False}
