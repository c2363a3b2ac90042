"""Every trainable parameter gets its gradient, whatever the pack, the stage and the recompute
policy.

- Megatron DDP with `overlap_grad_reduce` issues a bucket's reduce only when every parameter in
  it has reported a gradient on the last micro-batch; a text-only pack used to leave the vision
  encoder without one ("Communication call has not been issued for this bucket"). The trainer
  now runs the encoder on a blank merge block for such packs (adding exactly 0). Proved end to
  end: with the mock data's text-only packs (the last micro-batch of step 3 is one), a run with
  overlapped reduce gives the same losses as one without (1e-6 relative: one process, the
  reductions are no-ops, only the extra zero-contribution work differs), for full training and
  for stage 1 (text frozen, visual experts trained).
- Full activation recompute wraps layers in reentrant checkpoints, which give no gradient to
  the weights inside when no INPUT requires grad: a stage training only the visual experts (the
  embeddings and encoder frozen) got none. Proved in-process: those weights get non-zero
  gradients, equal to the run without recompute (1e-6 relative of each tensor's largest entry:
  recompute repeats the same fp32 forward).
Where to look on failure: megatron_navil/models/navil.py (vision_every_micro_batch),
megatron_navil/models/layer.py (_recompute), megatron_navil/training/trainer.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
from megatron_navil.config.training import StageConfig
from megatron_navil.data.synthetic import synthetic_batch
from megatron_navil.models.navil import NaViLModel
from megatron_navil.training.stages import apply_stage
from tests.training.runner import losses, pretrain
from tests.training.test_pretrain import BASE


@pytest.mark.processes
@pytest.mark.parametrize("stage", [[], ["stage.preset=stage1"]], ids=["full", "stage1"])
def test_overlapped_grad_reduce_with_text_only_packs(tmp_path, stage):
    plain, overlap = tmp_path / "plain.jsonl", tmp_path / "overlap.jsonl"
    args = BASE + ["--train-iters", "4"] + stage
    pretrain(1, args + ["--metrics-file", str(plain)])
    pretrain(1, args + ["optimizer.overlap_grad_reduce=true", "--metrics-file", str(overlap)])
    a, b = losses(plain), losses(overlap)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-6), (s, a[s], b[s])


def _visual_expert_grads(recompute: bool) -> dict[str, torch.Tensor]:
    par = ParallelConfig(recompute_granularity="full" if recompute else None)
    cfg = get_flavor("debug-internlm2")
    torch.manual_seed(0)
    model = NaViLModel(cfg, par, PrecisionConfig(backend="local"), experts_trainable=(False, True))
    apply_stage(
        [model],
        StageConfig(
            train_vision=False,
            train_connector=False,
            train_text=False,
            train_special_tokens=False,
            train_visual_experts=True,
        ),
    )
    model.train()
    batch = synthetic_batch(cfg, 256, torch.Generator().manual_seed(3))
    model(**batch.model_inputs()).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_full_recompute_trains_weights_behind_frozen_inputs(megatron_single_process):
    plain, recomputed = _visual_expert_grads(False), _visual_expert_grads(True)
    assert plain.keys() == recomputed.keys() and len(plain) > 0
    # (the last layer's visual projection and FFN feed only <IMG_CONTEXT> positions, which
    # take no loss: their gradient is exactly zero in both runs)
    assert sum(bool(g.abs().max() > 0) for g in plain.values()) >= len(plain) - 3
    for name, g in plain.items():
        r = recomputed[name]
        assert r is not None, f"{name}: no gradient under full recompute"
        torch.testing.assert_close(r, g, atol=1e-6 * max(float(g.abs().max()), 1e-12), rtol=0)
