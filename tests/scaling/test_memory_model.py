"""The memory model's static part against independent counts and Megatron's own formula.

- The parameter inventory (from the conversion registry) sums to NaViLModelConfig.
  num_parameters, an independent closed-form count, for every flavor; the GPUs of a layout
  together hold exactly the model: TP ranks split what is split, PP stages partition the
  layers, EP=2 halves the FFN experts.
- Static bytes per parameter equal Megatron-LM's documented rule for the distributed optimizer
  with bf16 and fp32 gradients: 2 (bf16 weight) + 4 (fp32 gradient) + 12 / DP (fp32 master,
  Adam m and v), i.e. "6 + 12/d" (Megatron-LM docs, distributed optimizer); 16 without sharding
  in fp32 (4 + 4 + 8: no master copy).
- A frozen part (stage1: the text LLM) takes parameters but no gradient or optimizer bytes.
Activations are checked against real tensors in test_memory_measured.py. On failure look at
megatron_navil/scaling/inventory.py and memory.py.
"""

from __future__ import annotations

import pytest

from megatron_navil.config.flavors import get_flavor
from megatron_navil.config.parallel import ParallelConfig
from megatron_navil.scaling.inventory import inventory, rank_params
from megatron_navil.scaling.memory import stage_memory
from megatron_navil.scaling.spec import WorkloadSpec

FLAVORS = ["debug-internlm2", "debug-qwen3", "navil-2b", "navil-9b"]


def _par(tp=1, pp=1, ep=1):
    return ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        sequence_parallel=tp > 1,
    )


@pytest.mark.parametrize("flavor", FLAVORS)
def test_inventory_counts_the_model(flavor):
    cfg = get_flavor(flavor)
    total, _ = cfg.num_parameters()
    # Megatron pads the vocabulary (embedding and LM head rows): the only allowed difference.
    from megatron_navil.config.model import padded_vocab_size

    pad = padded_vocab_size(cfg.llm.vocab_size, cfg.llm.make_vocab_size_divisible_by)
    pad_rows = 2 * (pad - cfg.llm.vocab_size) * cfg.llm.hidden_size
    assert sum(p.numel for p in inventory(cfg)) == total + pad_rows


@pytest.mark.parametrize("flavor", ["debug-internlm2", "navil-2b"])
@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 2), (4, 2, 1)])
def test_the_gpus_of_a_layout_hold_the_model_exactly(flavor, tp, pp, ep):
    cfg = get_flavor(flavor)
    par = _par(tp, pp, ep)
    whole = sum(p.numel for p in inventory(cfg))
    split = sum(p.numel for p in inventory(cfg) if p.tp_split)
    held = 0.0
    for stage in range(pp):
        rp = rank_params(cfg, par, stage)
        expert = sum(rp.expert.values())
        # one TP rank holds 1/tp of the split tensors; an EP pair holds one expert each
        held += sum(rp.by_part.values()) + expert * (ep - 1)
    replicated = whole - split
    assert held == pytest.approx(replicated + split / tp)


@pytest.mark.parametrize("dp", [1, 4, 16])
def test_static_bytes_follow_megatrons_6_plus_12_over_d(dp):
    cfg = get_flavor("navil-2b").apply_overrides({"experts.ffn_experts": False}, parse=False)
    w = WorkloadSpec(dtype="bfloat16")
    sm = stage_memory(cfg, _par(), w, dp, 0, 1, 1, recompute=False)
    n = sum(sm.by_part.values())
    assert sm.static / n == pytest.approx(6 + 12 / dp)


def test_fp32_without_sharding_is_16_bytes_per_parameter():
    cfg = get_flavor("debug-internlm2")
    w = WorkloadSpec(dtype="float32", use_distributed_optimizer=False)
    sm = stage_memory(cfg, _par(), w, 8, 0, 1, 1, recompute=False)
    assert sm.static / sum(sm.by_part.values()) == pytest.approx(16.0)


def test_expert_optimizer_state_shards_over_the_expert_dp_group():
    cfg = get_flavor("navil-2b")
    w = WorkloadSpec()
    one = stage_memory(cfg, _par(ep=1), w, 4, 0, 1, 1, False)
    two = stage_memory(cfg, _par(ep=2), w, 4, 0, 1, 1, False)
    rp1, rp2 = rank_params(cfg, _par(ep=1), 0), rank_params(cfg, _par(ep=2), 0)
    assert sum(rp2.expert.values()) == pytest.approx(sum(rp1.expert.values()) / 2)
    # EP=2 halves the experts a GPU holds but shards their state over DP/EP = 2, not 4
    expert_opt = lambda rp, shard: sum(rp.expert.values()) * 12 / shard  # noqa: E731
    assert one.optimizer - two.optimizer == pytest.approx(expert_opt(rp1, 4) - expert_opt(rp2, 2))


def test_stage1_freezes_the_text_llm():
    cfg = get_flavor("navil-2b")
    full = stage_memory(cfg, _par(), WorkloadSpec(stage="full"), 8, 0, 1, 1, False)
    s1 = stage_memory(cfg, _par(), WorkloadSpec(stage="stage1"), 8, 0, 1, 1, False)
    text = full.by_part["text"]
    assert s1.parameters == full.parameters
    assert full.gradients - s1.gradients == pytest.approx(text * 4)
    assert full.optimizer - s1.optimizer == pytest.approx(text * 12 / 8, rel=1e-6)


def test_pipeline_stages_hold_in_flight_micro_batches():
    cfg = get_flavor("navil-2b")
    w = WorkloadSpec()
    stages = [stage_memory(cfg, _par(pp=4), w, 1, s, 1, 16, False) for s in range(4)]
    assert [s.in_flight for s in stages] == [4, 3, 2, 1]  # 1F1B warm-up depth
    assert stages[0].vision_static > 0 and stages[1].vision_static == 0
    few = stage_memory(cfg, _par(pp=4), w, 1, 0, 1, 2, False)
    assert few.in_flight == 2
    assert stages[0].activations_full_recompute < stages[0].activations_no_recompute / 5
