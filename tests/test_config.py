"""Typed configs: every field documented, flavors valid and sized as published, overrides and
validation give clear errors, and the joint scaling-law helper follows the paper's points."""

import dataclasses

import pytest

from megatron_navil.config import (
    FLAVORS,
    ConfigBase,
    ConfigError,
    ConnectorConfig,
    ExpertConfig,
    LLMConfig,
    NaViLModelConfig,
    ParallelConfig,
    PrecisionConfig,
    VisionConfig,
    field_docs,
    get_flavor,
    propose_vision_config,
    propose_vision_size,
)

ALL = [
    VisionConfig,
    ConnectorConfig,
    LLMConfig,
    ExpertConfig,
    NaViLModelConfig,
    ParallelConfig,
    PrecisionConfig,
]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize("name", list(FLAVORS))
def test_flavors_validate_and_round_trip(name):
    cfg = get_flavor(name)
    again = NaViLModelConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_published_shapes_and_sizes():
    two, nine = get_flavor("navil-2b"), get_flavor("navil-9b")
    assert (two.llm.num_layers, two.llm.hidden_size, two.llm.ffn_hidden_size) == (24, 2048, 8192)
    assert (nine.llm.num_layers, nine.llm.hidden_size, nine.llm.ffn_hidden_size) == (
        36,
        4096,
        12288,
    )
    assert two.special_token_id("</box>") == 92544 and two.img_context_id == 92546
    assert two.img_start_id == 92548
    # Encoders near the paper's ~0.6B / ~1.2B; activated parameters near 2.4B / 9.2B (the exact
    # released encoder sizes are unknown, so 10%).
    assert abs(two.vision.num_parameters() / 0.6e9 - 1) < 0.05
    assert abs(nine.vision.num_parameters() / 1.2e9 - 1) < 0.05
    assert abs(two.num_parameters()[1] / 2.4e9 - 1) < 0.1
    assert abs(nine.num_parameters()[1] / 9.2e9 - 1) < 0.1


def test_scaling_law_helper_passes_near_paper_points():
    for llm, vit in ((0.5, 0.3), (1.8, 0.6), (7.0, 1.2)):
        assert abs(propose_vision_size(llm) / vit - 1) < 0.1
    # log-linear: doubling the LLM multiplies the encoder by a constant factor (~2^0.5)
    r1 = propose_vision_size(4) / propose_vision_size(2)
    r2 = propose_vision_size(40) / propose_vision_size(20)
    assert r1 == pytest.approx(r2) and 1.3 < r1 < 1.6
    v = propose_vision_config(7.0)
    v.validate()
    assert abs(v.num_parameters() / (propose_vision_size(7.0) * 1e9) - 1) < 0.1
    with pytest.raises(ConfigError):
        propose_vision_size(0)


def test_overrides_are_typed_and_named():
    cfg = get_flavor("debug-qwen3").apply_overrides(
        {"llm.num_layers": "6", "experts.ffn_experts": "false"}
    )
    assert cfg.llm.num_layers == 6 and cfg.experts.ffn_experts is False
    with pytest.raises(ConfigError, match="llm.num_layer"):
        cfg.apply_overrides({"llm.num_layer": 3})
    with pytest.raises(ConfigError, match="llm.num_layers: expected an integer"):
        cfg.apply_overrides({"llm.num_layers": "many"})
    with pytest.raises(ConfigError, match="output_proj_mode"):
        cfg.apply_overrides({"experts.output_proj_mode": "fused"})


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"vision.num_attention_heads": 3}, "divisible"),
        ({"llm.num_query_groups": 3}, "multiple"),
        ({"llm.first_special_token_id": 505}, "do not fit"),
        ({"vision.window_size": 40}, "multiple of"),
    ],
)
def test_invalid_model_configs(bad, match):
    with pytest.raises(ConfigError, match=match):
        get_flavor("debug-internlm2").apply_overrides(bad).validate()


def test_invalid_parallel_configs():
    with pytest.raises(ConfigError, match="exactly two FFN"):
        ParallelConfig(expert_model_parallel_size=4).validate()
    with pytest.raises(ConfigError, match="sequence-parallel"):
        ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2).validate()
    with pytest.raises(ConfigError, match="needs tensor_model_parallel_size"):
        ParallelConfig(sequence_parallel=True).validate()
    with pytest.raises(ConfigError, match="transformer_engine"):
        PrecisionConfig(backend="local", fp8="delayed").validate()
    assert issubclass(ParallelConfig, ConfigBase)
