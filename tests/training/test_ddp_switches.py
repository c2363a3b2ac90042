"""The DDP-side switches reach Megatron, refuse what cannot work, and do not change training.

- optimizer.overlap_param_gather reaches Megatron's DistributedDataParallelConfig (it used to
  stop at the optimizer config) and turns on DDP's forward pre-hooks; without the distributed
  optimizer, or without overlap_grad_reduce (Megatron supports it only with both), the config
  is refused with one message naming the flag to add or drop, at config validation and again
  where the DDP config is built.
- Parity on 2 gloo processes (DP = 2, distributed optimizer, overlapped grad reduce): with the
  parameter-gather overlap the losses of 4 steps, an evaluation in between, and a checkpoint
  saved at step 3 and resumed without the overlap all equal the run without it (1e-6
  relative: the same collectives on the same values, only issued later; a rank using stale
  shards of the other rank's update, in a forward, an evaluation or a save, moves the next loss
  by far more than that).
- precision.gradient_accumulation_fusion: auto (None) becomes on only for a model trained under
  Megatron DDP on the transformer_engine backend (`ddp_precision`), stays off for bare models
  and the local backend, reaches Megatron's config as given, and is refused with the local
  backend (config validation and translation) with a message naming the fix. The LM head, a
  Megatron linear that would need apex's kernel, accumulates unfused without apex.
Where to look on failure: training/step.py (ddp_config, params_gathered, ddp_precision),
config/training.py, models/transformer_config.py, models/language.py (_without_sequence_parallel).
"""

from __future__ import annotations

import pytest
import torch

from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
from megatron_navil.config.base import ConfigError
from megatron_navil.config.training import OptimizerSettings
from megatron_navil.models.navil import NaViLModel
from megatron_navil.models.transformer_config import _common, gradient_accumulation_fusion
from megatron_navil.training.step import ddp_config, ddp_precision, wrap_ddp
from tests.training.runner import losses, pretrain
from tests.training.test_pretrain import BASE

OVERLAP = ["--use-distributed-optimizer", "--overlap-grad-reduce"]


def test_overlap_param_gather_reaches_megatron_ddp(megatron_single_process):
    cfg = get_flavor("debug-internlm2")
    torch.manual_seed(0)
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig(backend="local"))
    (ddp,) = wrap_ddp(
        [model],
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        use_distributed_optimizer=True,
    )
    assert ddp.ddp_config.overlap_param_gather and ddp.ddp_config.use_distributed_optimizer
    assert ddp.use_forward_hook  # Megatron gathers in the forward pre-hooks
    (plain,) = wrap_ddp([NaViLModel(cfg, ParallelConfig(), PrecisionConfig(backend="local"))])
    assert not plain.ddp_config.overlap_param_gather and not plain.use_forward_hook


@pytest.mark.parametrize(
    "kwargs,needs",
    [
        (dict(overlap_grad_reduce=True), "--use-distributed-optimizer"),
        (dict(use_distributed_optimizer=True), "--overlap-grad-reduce"),
    ],
    ids=["no_distributed_optimizer", "no_overlap_grad_reduce"],
)
def test_overlap_param_gather_without_its_requirements_is_refused(kwargs, needs):
    with pytest.raises(ConfigError, match=needs) as e:
        ddp_config(overlap_param_gather=True, **kwargs)
    assert "--overlap-param-gather" in str(e.value) and "\n" not in str(e.value)
    settings = OptimizerSettings(
        overlap_param_gather=True,
        use_distributed_optimizer=kwargs.get("use_distributed_optimizer", False),
        overlap_grad_reduce=kwargs.get("overlap_grad_reduce", False),
    )
    with pytest.raises(ConfigError, match=needs):
        settings.validate()


@pytest.mark.processes
@pytest.mark.distributed
def test_overlap_param_gather_trains_the_same(tmp_path):
    off, on, ck = tmp_path / "off.jsonl", tmp_path / "on.jsonl", tmp_path / "ck"
    # one LR schedule for the 3- and 4-step runs (the decay otherwise spans --train-iters)
    args = BASE + OVERLAP + ["--eval-interval", "2", "--eval-iters", "1", "--lr-decay-iters", "4"]
    pretrain(2, args + ["--train-iters", "4", "--metrics-file", str(off)])
    gather = ["--overlap-param-gather"]
    pretrain(
        2, args + gather + ["--train-iters", "3", "--save", str(ck), "--metrics-file", str(on)]
    )
    pretrain(2, args + ["--train-iters", "4", "--save", str(ck), "--metrics-file", str(on)])
    a, b = losses(off), losses(on)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-6), (s, a[s], b[s])


def test_gradient_accumulation_fusion_translation():
    auto = PrecisionConfig()
    assert ddp_precision(auto, "transformer_engine").gradient_accumulation_fusion is True
    assert ddp_precision(auto, "local").gradient_accumulation_fusion is False
    off = PrecisionConfig(gradient_accumulation_fusion=False)
    assert ddp_precision(off, "transformer_engine").gradient_accumulation_fusion is False
    par = ParallelConfig()
    # a bare model (no DDP, no main_grad) keeps auto off, even on TE
    assert _common(par, auto, "transformer_engine")["gradient_accumulation_fusion"] is False
    on = ddp_precision(auto, "transformer_engine")
    assert _common(par, on, "transformer_engine")["gradient_accumulation_fusion"] is True
    assert _common(par, auto, "local")["gradient_accumulation_fusion"] is False


def test_gradient_accumulation_fusion_is_refused_on_the_local_backend():
    explicit = PrecisionConfig(backend="local", gradient_accumulation_fusion=True)
    with pytest.raises(ConfigError, match="--no-gradient-accumulation-fusion"):
        explicit.validate()
    resolved = PrecisionConfig(backend="auto", gradient_accumulation_fusion=True)
    resolved.validate()  # auto may still become TE on a GPU...
    with pytest.raises(ConfigError, match="transformer_engine backend"):
        gradient_accumulation_fusion(resolved, "local")  # ...but here it resolved to local


def test_lm_head_accumulates_unfused_without_apex():
    from megatron.core.tensor_parallel.layers import _grad_accum_fusion_available

    from megatron_navil.models.language import _without_sequence_parallel

    class Config:  # the two fields the head's copy changes
        sequence_parallel = True
        gradient_accumulation_fusion = True

    head = _without_sequence_parallel(Config())
    assert head.sequence_parallel is False
    assert head.gradient_accumulation_fusion is _grad_accum_fusion_available
