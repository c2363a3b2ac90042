"""The planner accepts exactly the layouts navil-pretrain would start, and says why it refuses.

- Every accepted layout passes each of the project's rules called on its own (ParallelConfig,
  the world/EP check, the pipeline split, the padded vocab, every parameter's TP split,
  Megatron-Core's TransformerConfig for the LLM and the encoder, the run config); every refused
  one carries the message of the first rule that fails, verbatim.
- The rules themselves agree with Megatron-Core, the independent reference: the pipeline split
  with `get_num_layers_to_build` (which only asserts, deep in model building), the EP rule with
  parallel_state's group sizes (world divisible by TP x EP x PP).
Real runs at 1 process, TP=2 and PP=2 are in test_memory_measured.py. On failure look at
megatron_navil/scaling/layouts.py, config/parallel.py (check_pipeline_split) and
utils/distributed.py (data_parallel_size).
"""

from __future__ import annotations

import itertools

import pytest

from megatron_navil.config.base import ConfigError
from megatron_navil.config.model import padded_vocab_size
from megatron_navil.config.model_section import ModelSection
from megatron_navil.config.parallel import ParallelConfig, PrecisionConfig, check_pipeline_split
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.plan import check_layout as check_param_splits
from megatron_navil.scaling.layouts import Layout, candidate_layouts, check_layout, run_config
from megatron_navil.scaling.spec import WorkloadSpec
from megatron_navil.utils.distributed import data_parallel_size

W = WorkloadSpec(seq_length=4096, global_batch_size=64)


def _rules(cfg, section, layout: Layout):
    """Each rule as its own callable, in the order a job meets them."""
    from megatron_navil.models.transformer_config import (
        llm_transformer_config,
        vision_transformer_config,
    )

    par = layout.parallel()
    prec = PrecisionConfig(params_dtype=W.dtype)
    run = run_config(section, layout, W)
    return [
        par.validate,
        lambda: data_parallel_size(par, layout.world),
        lambda: check_pipeline_split(cfg.llm.num_layers, par),
        lambda: padded_vocab_size(
            cfg.llm.vocab_size, cfg.llm.make_vocab_size_divisible_by, layout.tp
        ),
        lambda: check_param_splits(cfg, par),
        lambda: llm_transformer_config(cfg, par, prec, "local"),
        lambda: vision_transformer_config(cfg, par, prec, "local"),
        run.validate,
        lambda: run.training.num_microbatches(layout.dp),
    ]


@pytest.mark.parametrize("flavor,gpus", [("navil-2b", 16), ("navil-9b", 24), ("debug-qwen3", 8)])
def test_accepted_layouts_pass_every_rule_and_refusals_quote_the_failing_one(flavor, gpus):
    section = ModelSection(flavor=flavor)
    cfg = section.resolve()
    seen_refused = 0
    for layout in candidate_layouts(gpus):
        reason = check_layout(cfg, section, layout, W)
        first_failure = None
        for rule in _rules(cfg, section, layout):
            try:
                rule()
            except (ConfigError, ConversionError, ValueError, AssertionError) as e:
                first_failure = " ".join(str(e).split())
                break
        assert reason == first_failure, (layout, reason, first_failure)
        seen_refused += reason is not None
    assert seen_refused > 0  # the grid does exercise refusals


def test_refusals_name_the_thing_that_does_not_split():
    section = ModelSection(flavor="navil-2b")  # 24 layers, 16/8 heads, encoder with 12 heads
    cfg = section.resolve()
    why = {lay.label: check_layout(cfg, section, lay, W) for lay in candidate_layouts(16)}
    assert "vision_model" in why["TP8 PP1 EP1 DP2"] and "12 units" in why["TP8 PP1 EP1 DP2"]
    assert "do not split evenly" in why["TP1 PP16 EP1 DP1"]
    assert "must divide the data-parallel size 1" in why["TP1 PP16 EP2 DP1"]
    assert why["TP2 PP2 EP2 DP4"] is None


def _megatron_layers(num_layers, pp, first, vp):
    """Layers Megatron-Core builds on each stage, or None where it refuses."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig

    try:
        tc = TransformerConfig(
            num_layers=num_layers,
            hidden_size=64,
            num_attention_heads=4,
            pipeline_model_parallel_size=pp,
            num_layers_in_first_pipeline_stage=first,
            virtual_pipeline_model_parallel_size=vp,
            pipeline_dtype=None if pp == 1 else __import__("torch").float32,
        )
        per_stage = [
            sum(get_num_layers_to_build(tc, vp_stage=v, pp_rank=r) for v in range(vp or 1))
            for r in range(pp)
        ]
    except (AssertionError, ValueError):
        return None
    return per_stage if sum(per_stage) == num_layers else None


@pytest.mark.parametrize(
    "num_layers,pp,first,vp",
    [(n, pp, None, None) for n, pp in itertools.product([4, 6, 24, 36], [1, 2, 3, 4, 5, 8])]
    + [
        (24, 4, 3, None),
        (24, 4, 5, None),
        (30, 4, 6, None),
        (24, 2, None, 2),
        (24, 4, None, 4),
        (36, 4, None, 2),
    ],
)
def test_pipeline_split_agrees_with_megatron(num_layers, pp, first, vp):
    par = ParallelConfig(
        pipeline_model_parallel_size=pp,
        num_layers_in_first_pipeline_stage=first,
        virtual_pipeline_model_parallel_size=vp,
    )
    try:
        check_pipeline_split(num_layers, par)
        ours = True
    except ConfigError:
        ours = False
    assert ours == (_megatron_layers(num_layers, pp, first, vp) is not None)


@pytest.mark.parametrize("world", [2, 4, 6, 8, 12, 16])
def test_expert_rule_is_megatrons_group_arithmetic(world):
    # megatron/core/parallel_state.py: expert groups take TP x EP x PP ranks (expert TP = TP),
    # and the world must be a multiple of that; dense groups take TP x PP.
    for tp, pp, ep in itertools.product([1, 2, 4], [1, 2, 3], [1, 2]):
        megatron_ok = world % (tp * pp) == 0 and world % (tp * ep * pp) == 0
        try:
            data_parallel_size(
                ParallelConfig(
                    tensor_model_parallel_size=tp,
                    pipeline_model_parallel_size=pp,
                    expert_model_parallel_size=ep,
                    sequence_parallel=tp > 1,
                ),
                world,
            )
            ours = True
        except ConfigError:
            ours = False
        assert ours == megatron_ok, (world, tp, pp, ep)


def test_navil_pretrain_refuses_an_uneven_pipeline_in_one_line():
    from megatron_navil.config.pretrain import PretrainConfig

    cfg = PretrainConfig(mock_data=True).apply_overrides(
        {"parallel.pipeline_model_parallel_size": 3}, parse=False
    )
    with pytest.raises(ConfigError, match="4 LLM layers do not split evenly over"):
        cfg.validate()
