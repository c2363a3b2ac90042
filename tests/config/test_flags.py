"""Megatron-LM flags are declared on the config fields and navil-pretrain's parser is generated
from them:
- every flag of the hand-kept table it replaces (the oracle below, copied from
  megatron_navil/cli/args.py before the change) still exists, sets the same field and parses
  the same type; --bf16, --data-path (plain and Megatron-LM's weighted blend), --valid-data-path,
  --model, --config and positional dotted overrides keep their meaning;
- `navil-pretrain --help` lists every flag, with each boolean's `--no-` form;
- every boolean flag can be switched off (`--no-x` undoes a YAML `true`), and on;
- `4e-3` is a float on the command line, in a dotted override and in YAML;
- every field of the run config tree has a docstring (the help text comes from it).
Where to look on failure: megatron_navil/config/flags.py, cli/args.py, config/base.py.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megatron_navil.cli.args import build_parser, parse_config
from megatron_navil.config.base import ConfigBase, ConfigError, field_docs
from megatron_navil.config.flags import flag_fields
from megatron_navil.config.pretrain import PretrainConfig

# The hand-kept table navil-pretrain used before the flags moved onto the fields:
# flag -> (dotted config field, type); "flag" = a switch (was store_true).
OLD_TABLE = {
    "--tensor-model-parallel-size": ("parallel.tensor_model_parallel_size", int),
    "--pipeline-model-parallel-size": ("parallel.pipeline_model_parallel_size", int),
    "--virtual-pipeline-model-parallel-size": (
        "parallel.virtual_pipeline_model_parallel_size",
        int,
    ),
    "--decoder-first-pipeline-num-layers": ("parallel.num_layers_in_first_pipeline_stage", int),
    "--expert-model-parallel-size": ("parallel.expert_model_parallel_size", int),
    "--sequence-parallel": ("parallel.sequence_parallel", "flag"),
    "--recompute-granularity": ("parallel.recompute_granularity", str),
    "--recompute-method": ("parallel.recompute_method", str),
    "--recompute-num-layers": ("parallel.recompute_num_layers", int),
    "--micro-batch-size": ("training.micro_batch_size", int),
    "--global-batch-size": ("training.global_batch_size", int),
    "--seq-length": ("training.seq_length", int),
    "--train-iters": ("training.train_iters", int),
    "--seed": ("training.seed", int),
    "--eval-interval": ("training.eval_interval", int),
    "--eval-iters": ("training.eval_iters", int),
    "--lr": ("optimizer.lr", float),
    "--min-lr": ("optimizer.min_lr", float),
    "--lr-warmup-iters": ("optimizer.lr_warmup_iters", int),
    "--lr-decay-iters": ("optimizer.lr_decay_iters", int),
    "--lr-decay-style": ("optimizer.lr_decay_style", str),
    "--lr-wsd-decay-iters": ("optimizer.lr_wsd_decay_iters", int),
    "--weight-decay": ("optimizer.weight_decay", float),
    "--clip-grad": ("optimizer.clip_grad", float),
    "--adam-beta1": ("optimizer.adam_beta1", float),
    "--adam-beta2": ("optimizer.adam_beta2", float),
    "--use-distributed-optimizer": ("optimizer.use_distributed_optimizer", "flag"),
    "--overlap-grad-reduce": ("optimizer.overlap_grad_reduce", "flag"),
    "--overlap-param-gather": ("optimizer.overlap_param_gather", "flag"),
    "--save": ("checkpoint.save", str),
    "--load": ("checkpoint.load", str),
    "--save-interval": ("checkpoint.save_interval", int),
    "--async-save": ("checkpoint.async_save", "flag"),
    "--save-hf": ("checkpoint.save_hf", "flag"),
    "--finetune": ("checkpoint.finetune", "flag"),
    "--log-interval": ("logging.log_interval", int),
    "--tensorboard-dir": ("logging.tensorboard_dir", str),
    "--metrics-file": ("logging.metrics_file", str),
    "--tokenizer-model": ("tokenizer", str),
    "--mock-data": ("mock_data", "flag"),
    "--fp8-recipe": ("precision.fp8", str),
}
# The table's other flags, handled by hand then: flag -> dotted field(s) they set.
OLD_SPECIAL = {
    "--bf16": "precision.params_dtype",
    "--data-path": "data.train_paths",
    "--valid-data-path": "data.valid_paths",
    "--model": "model.flavor",
}


def _actions() -> dict[str, argparse.Action]:
    parser, _ = build_parser()
    return {s: a for a in parser._actions for s in a.option_strings}


def test_every_old_flag_sets_the_same_field_with_the_same_type():
    actions = _actions()
    for name, (dotted, kind) in OLD_TABLE.items():
        assert name in actions, f"{name} disappeared"
        action = actions[name]
        assert action.dest == dotted, (name, action.dest, dotted)
        if kind == "flag":
            assert isinstance(action, argparse.BooleanOptionalAction), name
        else:
            assert action.type is kind, (name, action.type, kind)
    for name, dotted in OLD_SPECIAL.items():
        assert actions[name].dest == dotted, name


def test_old_flags_parse_to_the_same_config():
    cfg = parse_config(
        ["--mock-data", "--bf16", "--model", "debug-qwen3", "--valid-data-path", "v1", "v2"]
        + ["--fp8-recipe", "delayed", "--recompute-granularity", "selective"]
        + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "64"]
        + ["--lr", "0.5", "--use-distributed-optimizer", "--save", "123"]
    )
    assert cfg.precision.params_dtype == "bfloat16" and cfg.model.flavor == "debug-qwen3"
    assert cfg.data.valid_paths == ("v1", "v2") and cfg.precision.fp8 == "delayed"
    assert cfg.parallel.recompute_granularity == "selective"
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.sequence_parallel
    assert cfg.optimizer.lr == 0.5 and cfg.optimizer.use_distributed_optimizer
    assert cfg.checkpoint.save == "123"  # a str flag stays a string (not read as YAML)


def test_data_path_takes_megatron_blend_syntax():
    plain = parse_config(["--mock-data", "--data-path", "a", "b"]).data
    assert (plain.train_paths, plain.train_weights) == (("a", "b"), ())
    blend = parse_config(["--mock-data", "--data-path", "0.7", "a", "0.3", "b"]).data
    assert (blend.train_paths, blend.train_weights) == (("a", "b"), (0.7, 0.3))
    with pytest.raises(ConfigError, match="'weight path' pairs"):
        parse_config(["--mock-data", "--data-path", "0.7", "a", "0.3"])


def test_help_lists_every_flag(capsys):
    from megatron_navil.cli.pretrain import _main

    with pytest.raises(SystemExit) as done:
        _main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    names = set(OLD_TABLE) | set(OLD_SPECIAL) | {"--config"}
    names |= {ff.flag.name for ff in flag_fields(PretrainConfig)}
    bools = [n for n, (_, kind) in OLD_TABLE.items() if kind == "flag"]
    names |= {"--no-" + n[2:] for n in bools}
    missing = [n for n in sorted(names) if n not in text]
    assert not missing, missing
    assert "[parallel.tensor_model_parallel_size]" in text  # the field path beside each flag
    assert "section.field=value" in text


def test_every_boolean_flag_can_be_switched_off_and_on(tmp_path):
    bools = [
        ff for ff in flag_fields(PretrainConfig) if isinstance(ff.type, type) and ff.type is bool
    ]
    assert {ff.path for ff in bools} >= {d for d, k in OLD_TABLE.values() if k == "flag"}
    parser, fields = build_parser()
    for ff in bools:
        name = ff.flag.name
        assert getattr(parser.parse_args([name]), ff.path) is True, name
        assert getattr(parser.parse_args(["--no-" + name[2:]]), ff.path) is False, name
    # end to end: a YAML `true` undone from the command line
    (tmp_path / "sp.yaml").write_text(
        "parallel: {tensor_model_parallel_size: 2, sequence_parallel: true}\n"
        "optimizer: {overlap_grad_reduce: true}\n"
    )
    on = ["--mock-data", "--config", str(tmp_path / "sp.yaml")]
    assert parse_config(on).parallel.sequence_parallel is True
    off = parse_config(on + ["--no-sequence-parallel", "--no-overlap-grad-reduce"])
    assert off.parallel.sequence_parallel is False
    assert off.optimizer.overlap_grad_reduce is False
    # a True default can be switched off too
    assert parse_config(["--mock-data"]).optimizer.use_distributed_optimizer is True
    undo = parse_config(["--mock-data", "--no-use-distributed-optimizer"])
    assert undo.optimizer.use_distributed_optimizer is False


def test_exponent_floats_everywhere(tmp_path):
    assert parse_config(["--mock-data", "--lr", "4e-3"]).optimizer.lr == 4e-3
    assert parse_config(["--mock-data", "optimizer.lr=4e-3"]).optimizer.lr == 4e-3
    assert PretrainConfig().apply_overrides({"optimizer.lr": "4e-3"}).optimizer.lr == 4e-3
    (tmp_path / "lr.yaml").write_text("optimizer: {lr: 4e-3, min_lr: 1.0e-5, adam_eps: 1e-8}\n")
    opt = parse_config(["--mock-data", "--config", str(tmp_path / "lr.yaml")]).optimizer
    assert (opt.lr, opt.min_lr, opt.adam_eps) == (4e-3, 1e-5, 1e-8)
    # integers stay integers, and a word is not a number
    assert parse_config(["--mock-data", "training.train_iters=10"]).training.train_iters == 10
    with pytest.raises(ConfigError, match="optimizer.lr: expected a number"):
        parse_config(["--mock-data", "optimizer.lr=e-3"])


def _tree(cls, prefix=""):
    for name, tp in cls.config_fields().items():
        owner = cls if name in {f.name for f in dataclasses.fields(cls)} else cls.FIELDS_FROM
        yield f"{prefix}{name}", owner, name
        if isinstance(tp, type) and issubclass(tp, ConfigBase):
            yield from _tree(tp, f"{prefix}{name}.")


def test_every_run_config_field_has_a_docstring():
    missing = [
        path for path, owner, name in _tree(PretrainConfig) if not field_docs(owner).get(name)
    ]
    assert not missing, missing
