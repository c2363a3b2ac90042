"""Command line of navil-pretrain: YAML config + Megatron-LM flag names + dotted overrides.

Precedence: defaults < --config YAML < Megatron-LM-style flags < `section.field=value` overrides.
`model.<field path>=value` (other than model.flavor) edits the model flavor, e.g.
`model.llm.num_layers=8`.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any, Optional

import yaml

from megatron_navil.config.base import ConfigError, field_docs, load_yaml, parse_scalar
from megatron_navil.config.pretrain import PretrainConfig
from megatron_navil.data.tokenizer import configured_vocabulary

# Megatron-LM flag -> (dotted config field, type); type "flag" = store_true.
MEGATRON_FLAGS: dict[str, tuple[str, Any]] = {
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


def _help_for(dotted: str) -> str:
    """The config field's own docstring (first line) as the flag's help."""
    cls, parts = PretrainConfig, dotted.split(".")
    for name in parts[:-1]:
        cls = typing.get_type_hints(cls)[name]
    doc = field_docs(cls).get(parts[-1], "")
    return f"{doc.splitlines()[0] if doc else ''} [{dotted}]"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are ConfigErrors: navil-pretrain then reports them once
    (rank 0) in one line, like every other configuration error, instead of once per rank."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="navil-pretrain",
        description="Pretrain a NaViL model on Megatron-Core "
        "(torchrun --no-python navil-pretrain ...).",
        epilog="Any config field can also be set as section.field=value "
        "(e.g. training.train_iters=10, "
        "model.llm.num_layers=8).",
    )
    p.add_argument("--config", help="YAML run config (see examples/configs/)")
    for flag, (dotted, kind) in MEGATRON_FLAGS.items():
        if kind == "flag":
            p.add_argument(flag, action="store_true", default=None, help=_help_for(dotted))
        else:
            p.add_argument(flag, type=kind, default=None, help=_help_for(dotted))
    p.add_argument(
        "--bf16", action="store_true", help="bfloat16 parameters [precision.params_dtype]"
    )
    p.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="datasets (navil-preprocess output dirs), optionally weighted like "
        "Megatron-LM: '0.7 dirA 0.3 dirB' [data.train_paths, data.train_weights]",
    )
    p.add_argument(
        "--valid-data-path", nargs="+", default=None, help="held-out datasets [data.valid_paths]"
    )
    p.add_argument("--model", dest="flavor", default=None, help="model flavor [model.flavor]")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    return p


def parse_data_path(items: list[str]) -> tuple[list[str], list[float]]:
    """['dirA'] or ['0.7', 'dirA', '0.3', 'dirB'] (Megatron-LM's blend syntax)."""
    try:
        float(items[0])
    except ValueError:
        return items, []
    if len(items) % 2:
        raise ConfigError(f"--data-path with weights needs 'weight path' pairs, got {items}")
    return items[1::2], [float(w) for w in items[0::2]]


def _set(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if parts[0] == "model" and parts[1:] != ["flavor"] and parts[1:2] != ["overrides"]:
        d.setdefault("model", {}).setdefault("overrides", {})[".".join(parts[1:])] = value
        return
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def parse_config(argv: Optional[list[str]] = None) -> PretrainConfig:
    args = build_parser().parse_intermixed_args(argv)
    raw: dict = {}
    if args.config:
        try:
            with open(args.config) as f:
                raw = load_yaml(f.read()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read --config {args.config}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {args.config} is not valid YAML: {e}") from None
    for flag, (dotted, _) in MEGATRON_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            _set(raw, dotted, value)
    if args.bf16:
        _set(raw, "precision.params_dtype", "bfloat16")
    if args.flavor:
        _set(raw, "model.flavor", args.flavor)
    if args.data_path:
        paths, weights = parse_data_path(args.data_path)
        _set(raw, "data.train_paths", paths)
        _set(raw, "data.train_weights", weights)
    if args.valid_data_path:
        _set(raw, "data.valid_paths", args.valid_data_path)
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        _set(raw, key, parse_scalar(value))
    cfg = PretrainConfig.from_dict(raw)
    cfg.validate()
    cfg.resolved_model(configured_vocabulary(cfg.tokenizer))  # a bad tokenizer: refused here
    return cfg
