"""`navil-scaling plan` ranks what fits, by a step time that behaves like the hardware would.

- Ranked layouts are sorted by predicted step time, each fits the usable memory, and each is
  the fastest fitting (micro-batch, recompute) choice of its layout (checked by brute force).
- Too little memory: the layout is listed with the smallest memory it would need; no layout
  fits: the plan says what to change.
- The step-time model keeps the physics: doubling data parallelism at a fixed global batch
  halves compute (time falls), slower links between nodes never speed a step up, and the
  predicted MFU uses the trainer's own FLOP count (megatron_navil/training/flops.py), so for a
  real packed batch the planner's FLOPs equal what navil-pretrain reports (to 1e-9).
- A measured throughput file replaces the defaults; a malformed one is one error naming it.
- The navil-pretrain arguments printed for a choice build exactly the planned model at that
  layout, micro-batch and recompute (parsed by navil-pretrain's own parser).
On failure look at megatron_navil/scaling/planner.py, steptime.py and throughput.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_navil.config.flavors import get_flavor
from megatron_navil.config.model_section import ModelSection
from megatron_navil.scaling.layouts import Layout
from megatron_navil.scaling.memory import layout_memory
from megatron_navil.scaling.planner import _micro_batch_sizes, plan
from megatron_navil.scaling.spec import ClusterSpec, WorkloadSpec
from megatron_navil.scaling.steptime import predict_step
from megatron_navil.scaling.throughput import ThroughputError, ThroughputTable

W = WorkloadSpec(seq_length=4096, global_batch_size=128)


@pytest.fixture(scope="module")
def plan_2b():
    return plan(ModelSection(flavor="navil-2b"), ClusterSpec(num_gpus=16), W)


def test_ranked_layouts_fit_and_are_sorted(plan_2b):
    assert plan_2b.ranked
    times = [c.time.step_s for c in plan_2b.ranked]
    assert times == sorted(times)
    for c in plan_2b.ranked:
        assert c.peak_bytes <= plan_2b.cluster.usable_bytes


def test_each_choice_is_the_fastest_that_fits(plan_2b):
    cfg = plan_2b.section.resolve()
    cluster, table = plan_2b.cluster, ThroughputTable()
    for c in plan_2b.ranked[:4]:
        lay = c.layout
        options = []
        for mbs in _micro_batch_sizes(W, lay.dp):
            m = W.global_batch_size // (mbs * lay.dp)
            for rc in (False, True):
                peak = max(
                    s.total for s in layout_memory(cfg, lay.parallel(), W, lay.dp, mbs, m, rc)
                )
                if peak <= cluster.usable_bytes:
                    options.append(predict_step(cfg, lay, W, cluster, table, mbs, m, rc).step_s)
        assert c.time.step_s == pytest.approx(min(options))


def test_too_little_memory_is_named():
    small = plan(ModelSection(flavor="navil-9b"), ClusterSpec(num_gpus=2, gpu_memory_gb=24), W)
    assert not small.ranked
    assert small.too_big and all(g > 18 for _, g, _ in small.too_big)
    assert any("no layout fits" in n for n in small.notes)


def test_step_time_behaves_like_hardware():
    cfg = get_flavor("navil-2b")
    cluster, table = ClusterSpec(num_gpus=64), ThroughputTable()

    def t(lay, c=cluster):
        return predict_step(cfg, lay, W, c, table, 1, W.global_batch_size // lay.dp, False)

    t8, t16 = t(Layout(2, 1, 1, 8)), t(Layout(2, 1, 1, 16))
    assert t16.compute_s == pytest.approx(t8.compute_s)  # per micro-batch
    assert t16.step_s < 0.6 * t8.step_s  # half the micro-batches per rank
    slow = ClusterSpec(num_gpus=64, inter_node_gbps=5.0)
    assert t(Layout(2, 1, 1, 16), slow).step_s >= t16.step_s
    assert 0 < t16.mfu < 1


def test_planner_flops_are_the_trainers():
    from megatron_navil.batch import padding_segments
    from megatron_navil.training.data import MockPackLoader
    from megatron_navil.training.flops import llm_flops, micro_batch_count, vision_flops

    cfg = get_flavor("debug-qwen3")
    batch = next(MockPackLoader(cfg, 1024, 3, 0, 1))
    (pad,) = padding_segments(batch)  # padding is not model work: leave it out by hand
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).double()
    lens[pad] = 0
    tokens = float(lens.sum())
    visual = float(cfg.visual_token_mask(batch.tokens).sum())
    counted = float(((batch.loss_mask != 0) & (batch.tokens != cfg.img_context_id)).sum())
    n = batch.grid_thw.prod(dim=1).double()
    ours = llm_flops(cfg, tokens, visual, float((lens * (lens + 1) / 2).sum()), counted)
    ours += vision_flops(cfg, float(n.sum()), float((n**2).sum()))
    assert ours == pytest.approx(micro_batch_count(cfg, batch).forward, rel=1e-12)
    assert isinstance(batch.tokens, torch.Tensor)


def test_frozen_parts_cost_no_weight_gradients_in_the_plan():
    """stage1 freezes the text LLM: the plan counts (and times) no text wgrad, exactly the
    trainer's rule (training/flop_rules.py), instead of 3x forward for every part."""
    import dataclasses

    from megatron_navil.config.training import StageConfig
    from megatron_navil.scaling.memory import MicroBatch
    from megatron_navil.training.flops import BatchCounts, count_flops, trained_parts

    cfg, table = get_flavor("navil-2b"), ThroughputTable()
    lay, stage1 = Layout(2, 1, 1, 8), dataclasses.replace(W, stage="stage1")

    def t(w):
        return predict_step(cfg, lay, w, ClusterSpec(num_gpus=16), table, 1, 16, False)

    full, frozen = t(W), t(stage1)
    assert frozen.model_flops < full.model_flops and frozen.compute_s < full.compute_s
    mb = MicroBatch.of(cfg, stage1, 1)
    sample = min(stage1.tokens_per_sample, mb.tokens)
    # the planner's micro-batch: images of one size, no windows in navil-2b
    c = BatchCounts(
        tokens=mb.tokens,
        visual=mb.visual,
        causal_pairs=mb.tokens * (sample + 1) / 2,
        counted=mb.tokens - mb.visual,
        special=True,
        patches=mb.patches,
        full_pairs=mb.square_patches,
        window_pairs=mb.square_patches,
    )
    step = count_flops(cfg, c, trained_parts(StageConfig(preset="stage1"))).total * 16 * lay.dp
    assert frozen.model_flops == pytest.approx(step, rel=1e-12)


def test_measured_throughput_file_replaces_defaults(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(
        json.dumps(
            {"device": "H200", "rows": [{"component": "llm", "width": 2048, "tflops": 100.0}]}
        )
    )
    table = ThroughputTable.load(str(f))
    assert table.tflops("llm", 2048) == 100.0 and "H200" in table.source
    assert table.tflops("vision", 1024) == ThroughputTable().tflops("vision", 1024)
    # interpolation in log(width) between the default rows, clamped outside
    d = ThroughputTable()
    assert d.tflops("vision", 1024) < d.tflops("vision", 1254) < d.tflops("vision", 1536)
    assert d.tflops("vision", 8192) == d.tflops("vision", 1536)
    f.write_text('{"rows": [{"component": "mlp", "width": 1, "tflops": 1}]}')
    with pytest.raises(ThroughputError, match="unknown component 'mlp'"):
        ThroughputTable.load(str(f))
    f.write_text("[1, 2")
    with pytest.raises(ThroughputError, match="is not a throughput table"):
        ThroughputTable.load(str(f))


def test_the_plan_prints_arguments_navil_pretrain_runs_as_planned(monkeypatch):
    from megatron_navil.cli.args import parse_config
    from megatron_navil.scaling.planner import pretrain_args
    from megatron_navil.scaling.shapes import planned_model

    section, _ = planned_model(llm_size=3.0)  # a model that is not a flavor
    w = WorkloadSpec(seq_length=4096, global_batch_size=64, stage="stage1")
    p = plan(section, ClusterSpec(num_gpus=16, gpu_memory_gb=40), w)
    for choice in p.ranked[:5] + [c for c in p.ranked if c.recompute][:1]:
        cfg = parse_config(pretrain_args(section, w, choice) + ["--mock-data"])
        assert cfg.model.resolve() == section.resolve()
        par, lay = cfg.parallel, choice.layout
        assert (
            par.tensor_model_parallel_size,
            par.pipeline_model_parallel_size,
            par.expert_model_parallel_size,
        ) == (lay.tp, lay.pp, lay.ep)
        assert par.sequence_parallel == (lay.tp > 1)
        assert cfg.training.micro_batch_size == choice.micro_batch_size
        assert par.recompute_granularity == ("full" if choice.recompute else None)
        assert cfg.precision.params_dtype == "bfloat16" and cfg.stage.preset == "stage1"
        cfg.validate()
        assert cfg.training.num_microbatches(lay.dp) == choice.num_microbatches


def test_plan_json_has_every_breakdown(plan_2b):
    d = plan_2b.to_dict()
    first = d["ranked"][0]
    for key in (
        "parameters",
        "gradients",
        "optimizer",
        "activations_no_recompute",
        "activations_full_recompute",
        "vision_static",
        "vision_activations",
        "total",
    ):
        assert key in first["memory_gib"]
    assert {"step_s", "tokens_per_s", "mfu"} <= set(first["time"])
    assert d["refused"] and all(r["reason"] for r in d["refused"])
    json.dumps(d)  # serialisable
