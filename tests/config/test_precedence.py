"""navil-pretrain's settings stack: defaults < model flavor < --config YAML < Megatron-LM flags <
dotted `section.field=value` overrides, each level overriding the one below, for a parallel field
(TP size), a training field (seq_length), a data field (valid_paths), a boolean
(sequence_parallel, switched on, off and on again) and a model field (llm.num_layers, whose
default is the flavor's, not the dataclass's). Where the words stand on the command line does
not matter, only their kind. Exact comparisons (the values are set, not computed).
Where to look on failure: megatron_navil/cli/args.py (parse_config), config/flags.py,
config/model_section.py.
"""

from __future__ import annotations

import pytest

from megatron_navil.cli.args import parse_config
from megatron_navil.config.model import LLMConfig

YAML = """
model:
  llm: {num_layers: 6}
parallel:
  tensor_model_parallel_size: 2
  sequence_parallel: true
training:
  seq_length: 512
data:
  valid_paths: [from_yaml]
"""
FLAGS = [
    "--tensor-model-parallel-size",
    "4",
    "--no-sequence-parallel",
    "--seq-length",
    "256",
    "--valid-data-path",
    "from_flag",
    "--num-layers",
    "5",
]
DOTTED = [
    "parallel.tensor_model_parallel_size=8",
    "parallel.sequence_parallel=true",
    "training.seq_length=128",
    "data.valid_paths=[from_override]",
    "model.llm.num_layers=3",
]


def _seen(cfg):
    return (
        cfg.parallel.tensor_model_parallel_size,
        cfg.training.seq_length,
        cfg.data.valid_paths,
        cfg.parallel.sequence_parallel,
        cfg.resolved_model().llm.num_layers,
    )


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    return str(path)


def test_each_level_overrides_the_one_below(yaml_file):
    base = ["--mock-data"]
    # defaults, with the model field at the flavor's value (debug-internlm2: 4 layers), not the
    # dataclass default (24)
    assert LLMConfig().num_layers == 24
    assert _seen(parse_config(base)) == (1, 2048, (), False, 4)
    with_yaml = base + ["--config", yaml_file]
    assert _seen(parse_config(with_yaml)) == (2, 512, ("from_yaml",), True, 6)
    with_flags = with_yaml + FLAGS
    assert _seen(parse_config(with_flags)) == (4, 256, ("from_flag",), False, 5)
    assert _seen(parse_config(with_flags + DOTTED)) == (8, 128, ("from_override",), True, 3)


def test_position_on_the_command_line_does_not_matter(yaml_file):
    argv = DOTTED + FLAGS + ["--mock-data", "--config", yaml_file]
    assert _seen(parse_config(argv)) == (8, 128, ("from_override",), True, 3)


def test_later_dotted_override_wins():
    argv = ["--mock-data", "training.seq_length=128", "training.seq_length=64"]
    assert parse_config(argv).training.seq_length == 64
