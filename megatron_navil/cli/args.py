"""Command line of navil-pretrain: YAML config + Megatron-LM flag names + dotted overrides.

Precedence: defaults < the model flavor < --config YAML < Megatron-LM flags < `section.field=value`
overrides. The flags are generated from the config fields that declare one
(megatron_navil/config/flags.py), so every flag, its type and its help come from the field;
booleans take `--x` / `--no-x`. `model.<field path>=value` sets a model field on top of the
flavor, e.g. `model.llm.num_layers=8` (the same as `--num-layers 8`).
"""

from __future__ import annotations

import argparse
from typing import Optional

import yaml

from megatron_navil.config.base import ConfigError, load_yaml, parse_scalar
from megatron_navil.config.flags import FlagField, add_flags, flag_values
from megatron_navil.config.pretrain import PretrainConfig
from megatron_navil.data.tokenizer import configured_vocabulary

USAGE = "navil-pretrain [--config YAML] [--FLAG VALUE ...] [section.field=value ...]"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are ConfigErrors: navil-pretrain then reports them once
    (rank 0) in one line, like every other configuration error, instead of once per rank."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> tuple[argparse.ArgumentParser, list[FlagField]]:
    """The parser and the config fields its generated flags set."""
    p = _Parser(
        prog="navil-pretrain",
        usage=USAGE,
        description="Pretrain a NaViL model on Megatron-Core "
        "(torchrun --no-python navil-pretrain ...). Precedence: defaults < model flavor < "
        "--config YAML < flags < section.field=value overrides.",
        epilog="Any config field can also be set as section.field=value "
        "(e.g. training.train_iters=10, data.max_images_per_pack=32, model.llm.num_layers=8); "
        "every field is documented in megatron_navil/config/.",
    )
    p.add_argument("--config", metavar="YAML", help="YAML run config (see examples/configs/)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides", metavar="K=V")
    return p, add_flags(p, PretrainConfig)


def read_yaml_config(path: str) -> PretrainConfig:
    try:
        with open(path) as f:
            raw = load_yaml(f.read()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML: {e}") from None
    return PretrainConfig.from_dict(raw)


def parse_overrides(items: list[str]) -> list[tuple[str, object]]:
    """`section.field=value` words -> (dotted key, YAML scalar), in command-line order."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        out.append((key, parse_scalar(value)))
    return out


def parse_config(argv: Optional[list[str]] = None) -> PretrainConfig:
    parser, fields = build_parser()
    args = parser.parse_intermixed_args(argv)
    cfg = read_yaml_config(args.config) if args.config else PretrainConfig()
    cfg = cfg.apply_overrides(flag_values(args, fields), parse=False)
    for key, value in parse_overrides(args.overrides):  # later ones win
        cfg = cfg.apply_overrides({key: value}, parse=False)
    cfg.validate()
    cfg.resolved_model(configured_vocabulary(cfg.tokenizer))  # a bad tokenizer: refused here
    return cfg
