"""The run config's model section is typed: `model: {flavor: NAME, llm: {num_layers: 8}, ...}`
with NaViLModelConfig's names and nesting.
- each value is type-checked against NaViLModelConfig's field type, and an unknown field is one
  error naming the valid ones at that level;
- defaults come from the chosen flavor: a field not set keeps the flavor's value, changing the
  flavor (YAML, --model, model.flavor=) changes every default and keeps what was set;
- YAML nesting, `model.llm.num_layers=8`, `--num-layers 8`, a whole sub-section
  (`model.llm={...}`) and `PretrainConfig.apply_overrides({"model.llm.num_layers": 8})` all set
  the same thing;
- the section knows which fields were set, so the vocabulary still follows the tokenizer unless
  llm.vocab_size / llm.first_special_token_id were set (the vocabulary is given as a value here;
  tests/training/test_vocab_from_tokenizer.py covers real tokenizer files);
- to_dict() is the nested form and round-trips;
- the example configs (examples/configs/*.yaml) read and validate in this form.
Where to look on failure: megatron_navil/config/model_section.py, config/pretrain.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_navil.cli.args import parse_config
from megatron_navil.config import get_flavor
from megatron_navil.config.base import ConfigError, load_yaml
from megatron_navil.config.pretrain import PretrainConfig

YAML = """
model:
  flavor: debug-qwen3
  llm: {num_layers: 2, rope_theta: 5.0e5}
  vision: {fullatt_block_indexes: [0, 1]}
  max_dynamic_patch: 512
"""


def test_yaml_section_is_typed_and_defaults_come_from_the_flavor():
    cfg = PretrainConfig.from_dict(load_yaml(YAML))
    model, flavor = cfg.resolved_model(), get_flavor("debug-qwen3")
    assert model.llm.num_layers == 2 and model.llm.rope_theta == 5e5
    assert model.vision.fullatt_block_indexes == (0, 1) and model.max_dynamic_patch == 512
    # everything not set is the flavor's
    expect = flavor.apply_overrides(
        {
            "llm.num_layers": 2,
            "llm.rope_theta": 5e5,
            "vision.fullatt_block_indexes": [0, 1],
            "max_dynamic_patch": 512,
        }
    )
    assert model == expect


def test_changing_the_flavor_changes_defaults_and_keeps_what_was_set(tmp_path):
    (tmp_path / "m.yaml").write_text(YAML)
    cfg = parse_config(["--mock-data", "--config", str(tmp_path / "m.yaml"), "--model", "navil-9b"])
    model, nine = cfg.resolved_model(), get_flavor("navil-9b")
    assert model.llm.hidden_size == nine.llm.hidden_size == 4096  # the new flavor's default
    assert model.min_dynamic_patch == nine.min_dynamic_patch
    assert model.llm.num_layers == 2 and model.max_dynamic_patch == 512  # what was set stays
    again = PretrainConfig().apply_overrides(
        {"model.llm.num_layers": 2, "model.flavor": "navil-2b"}
    )
    assert again.resolved_model().llm.hidden_size == get_flavor("navil-2b").llm.hidden_size
    assert again.resolved_model().llm.num_layers == 2


@pytest.mark.parametrize(
    "how",
    [
        ["model.llm.num_layers=7"],
        ["--num-layers", "7"],
        ["model.llm={num_layers: 7}"],
    ],
    ids=["dotted", "flag", "subsection"],
)
def test_every_way_of_setting_a_model_field_agrees(how):
    cfg = parse_config(["--mock-data"] + how)
    assert cfg.model.explicit == {"llm.num_layers": 7}
    assert cfg == PretrainConfig(mock_data=True).apply_overrides({"model.llm.num_layers": 7})
    assert cfg.resolved_model().llm.num_layers == 7
    assert cfg.resolved_model().llm.hidden_size == get_flavor("debug-internlm2").llm.hidden_size


@pytest.mark.parametrize(
    "setting, match",
    [
        ({"model.llm.num_layers": "many"}, r"model\.llm\.num_layers: expected an integer"),
        ({"model.llm.num_layer": 3}, r"model\.llm\.num_layer: no such model field.*num_layers"),
        ({"model.lm.num_layers": 3}, r"model\.lm: no such model field; valid under model: .*llm"),
        ({"model.experts.output_proj_mode": "fused"}, "is not one of"),
        ({"model.llm": 5}, r"model\.llm: expected a mapping"),
        ({"model.template.x": 5}, r"model\.template is not a config section"),
        ({"model.flavor": "navil-1b"}, "unknown model flavor 'navil-1b'"),
    ],
)
def test_bad_model_settings_are_one_clear_error(setting, match):
    with pytest.raises(ConfigError, match=match) as err:
        PretrainConfig(mock_data=True).apply_overrides(setting).validate()
    assert "\n" not in str(err.value)


def test_the_section_knows_what_was_set():
    vocabulary = (300, 288)  # (size, first special token id) of some tokenizer
    job = PretrainConfig(mock_data=True, tokenizer="tok")
    llm = job.resolved_model(vocabulary).llm
    assert (llm.vocab_size, llm.first_special_token_id) == (300, 288)  # follows the tokenizer
    padded = job.apply_overrides({"model.llm.vocab_size": 340})  # set explicitly: kept
    assert padded.model.is_set("llm.vocab_size")
    assert padded.resolved_model(vocabulary).llm.vocab_size == 340
    # set through the YAML nesting, it counts as set too: a contradiction is refused
    nested = PretrainConfig.from_dict(
        {"tokenizer": "tok", "mock_data": True, "model": {"llm": {"first_special_token_id": 7}}}
    )
    with pytest.raises(ConfigError, match="first_special_token_id=7 contradicts"):
        nested.resolved_model(vocabulary)


def test_nested_form_round_trips():
    cfg = PretrainConfig.from_dict(load_yaml(YAML))
    d = cfg.to_dict()["model"]
    assert d == {
        "flavor": "debug-qwen3",
        "llm": {"num_layers": 2, "rope_theta": 5e5},
        "vision": {"fullatt_block_indexes": [0, 1]},
        "max_dynamic_patch": 512,
    }
    assert PretrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[2] / "examples" / "configs").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_example_configs_read_and_validate(path):
    cfg = parse_config(
        ["--config", str(path), "--mock-data", "--save", "ck"]
    )  # navil_9b: --save-hf
    assert cfg.model.flavor == load_yaml(path.read_text())["model"]["flavor"]
