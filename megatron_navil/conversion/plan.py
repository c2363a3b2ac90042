"""What a conversion must produce, checked before any data moves.

- `pairs(cfg)`: every (Megatron name, HF names, transform, TP split) of the model.
- `hf_shapes(cfg)`: the exact HF tensor shapes, from the reference model (the HF layout) built
  on the meta device (no memory, any size).
- `check_source(source, cfg)`: the source's keys are exactly the model's (an unmapped or missing
  key is an error naming it) with the right shapes.
- `check_layout(cfg, parallel)`: a requested TP/PP/EP layout can hold the model.
A source is anything with `names()`, `info(name) -> (shape, dtype)`, `load(name)` and
`describe()` (a safetensors directory, or llm-to-navil's virtual source); `load` returns a
fresh tensor the caller owns (the checkpoint writer frees it once written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_navil.config.base import ConfigError
from megatron_navil.config.model import NaViLModelConfig, padded_vocab_size
from megatron_navil.config.parallel import ParallelConfig
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.registry import expand, mappings
from megatron_navil.conversion.transforms import TPSplit, Transform


class Source(Protocol):
    """What a converter reads tensors from (an HF safetensors directory, a Megatron checkpoint, a
    plain LLM seen as NaViL): names, shape/dtype without loading, one tensor at a time, and a
    description for messages. One tensor at a time keeps a conversion's memory at the largest
    tensor."""

    def names(self) -> list[str]: ...
    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]: ...
    def load(self, name: str) -> torch.Tensor: ...
    def describe(self) -> str: ...


@dataclass(frozen=True)
class Pair:
    """One concrete parameter of a conversion: a Megatron name, the HF names it is made of, the
    transform between them and its TP split (a ParamMapping with its layer wildcard expanded)."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform
    tp: TPSplit


def padded_vocab(cfg: NaViLModelConfig) -> int:
    return padded_vocab_size(cfg.llm.vocab_size, cfg.llm.make_vocab_size_divisible_by)


def pairs(cfg: NaViLModelConfig) -> list[Pair]:
    return [
        Pair(meg, hf, m.transform, m.tp)
        for m in mappings(cfg, padded_vocab(cfg))
        for meg, hf in expand(m, cfg)
    ]


def hf_shapes(cfg: NaViLModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, from the reference model on the meta device."""
    from megatron_navil.reference import NaViLReference

    with torch.device("meta"):
        ref = NaViLReference(cfg)
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def megatron_shapes(cfg: NaViLModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = hf_shapes(cfg)
    return {
        p.megatron: tuple(p.transform.megatron_shape([shapes[n] for n in p.hf])) for p in pairs(cfg)
    }


def _listing(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" (and {len(names) - 6} more)" if len(names) > 6 else "")


def check_source(source: Source, cfg: NaViLModelConfig) -> torch.dtype:
    """Keys and shapes of `source` against the model; returns the source's (float) dtype."""
    want = hf_shapes(cfg)
    have = set(source.names())
    missing = sorted(set(want) - have)
    if missing:
        raise ConversionError(
            f"{source.describe()} lacks {_listing(missing)}; the weights do not "
            "match the model config (config.json)"
        )
    extra = sorted(have - set(want))
    if extra:
        raise ConversionError(
            f"{source.describe()} holds {_listing(extra)}, which the NaViL "
            "registry does not map; the weights do not match the model config"
        )
    dtypes = {}
    for name, shape in want.items():
        got, dtype = source.info(name)
        if tuple(got) != shape:
            raise ConversionError(
                f"{source.describe()}: {name} has shape {list(got)}, the model "
                f"config needs {list(shape)}"
            )
        if not dtype.is_floating_point:
            raise ConversionError(f"{source.describe()}: {name} is {dtype}, not a float tensor")
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    return max(dtypes, key=dtypes.get)


def check_layout(cfg: NaViLModelConfig, parallel: ParallelConfig) -> None:
    """Can `parallel` hold this model? Names the first parameter or count that cannot split."""
    try:
        parallel.validate()
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if parallel.expert_model_parallel_size > 1 and not cfg.experts.ffn_experts:
        raise ConversionError(
            "--expert-model-parallel-size 2 needs FFN experts (experts.ffn_experts)"
        )
    if cfg.llm.num_layers < pp:
        raise ConversionError(
            f"{cfg.llm.num_layers} LLM layers cannot fill "
            f"--pipeline-model-parallel-size {pp} stages"
        )
    shapes = megatron_shapes(cfg)
    for p in pairs(cfg):
        p.tp.check(p.megatron, shapes[p.megatron], tp)
