"""Which parameters one GPU holds at a layout, by part, from the model's own parameter list.

The list (Megatron name, canonical shape, TP split) is the conversion registry's
(`conversion.plan.pairs` / `megatron_shapes`, built from the reference model on the meta device):
the same facts that decide how checkpoints shard, so the memory model cannot drift from the
model. Placement follows the model code: the vision encoder, connector and embeddings on the
first pipeline stage, the final norm and LM head on the last, decoder layers split evenly
(or with `num_layers_in_first_pipeline_stage`); an FFN expert per EP rank when EP = 2.
Parts are training/stages.py's: vision, connector, visual_experts, text, special_tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.config.parallel import ParallelConfig
from megatron_navil.conversion.plan import megatron_shapes, pairs
from megatron_navil.models.modality import VISUAL

_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


@dataclass(frozen=True)
class Param:
    """One canonical (TP=1) parameter of the model."""

    name: str
    """Megatron name."""
    numel: int
    """Elements of the canonical tensor."""
    tp_split: bool
    """Split over TP ranks (False: replicated on each)."""
    part: str
    """Training-stage part (training/stages.py)."""
    layer: int | None
    """LLM decoder layer index (None: not a decoder layer)."""
    where: str
    """`first` (vision, connector, embeddings), `last` (final norm, LM head) or `layer`."""
    expert: bool
    """An FFN expert's weight (split over EP ranks; sharded over the expert-DP group)."""


def _part(name: str) -> str:
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("connector."):
        return "connector"
    if "special_token_embedding" in name:
        return "special_tokens"
    m = _EXPERT.search(name)
    if m:
        return "visual_experts" if int(m.group(1)) == VISUAL else "text"
    return "visual_experts" if ".visual." in name else "text"


def _where(name: str) -> str:
    if _LAYER.match(name):
        return "layer"
    if "output_layer" in name or "final_layernorm" in name:
        return "last"
    return "first"


_CACHE: dict[str, tuple[Param, ...]] = {}


def inventory(cfg: NaViLModelConfig) -> tuple[Param, ...]:
    """Every canonical parameter of `cfg` (cached per config: a planner asks hundreds of
    times)."""
    key = repr(cfg.to_dict())
    if key not in _CACHE:
        if len(_CACHE) > 32:
            _CACHE.clear()
        _CACHE[key] = _build(cfg)
    return _CACHE[key]


def _build(cfg: NaViLModelConfig) -> tuple[Param, ...]:
    shapes = megatron_shapes(cfg)
    out = []
    for p in pairs(cfg):
        m = _LAYER.match(p.megatron)
        out.append(
            Param(
                name=p.megatron,
                numel=math.prod(shapes[p.megatron]),
                tp_split=p.tp.axis is not None,
                part=_part(p.megatron),
                layer=int(m.group(1)) if m else None,
                where=_where(p.megatron),
                expert=bool(_EXPERT.search(p.megatron)),
            )
        )
    return tuple(out)


def stage_layers(num_layers: int, parallel: ParallelConfig) -> list[range]:
    """LLM layer indices of each pipeline stage (the split config.parallel.check_pipeline_split
    allows)."""
    pp, first = parallel.pipeline_model_parallel_size, parallel.num_layers_in_first_pipeline_stage
    if pp == 1:
        return [range(num_layers)]
    if first is None:
        per = num_layers // pp
        return [range(s * per, (s + 1) * per) for s in range(pp)]
    per = (num_layers - first) // (pp - 1)
    return [range(first)] + [range(first + s * per, first + (s + 1) * per) for s in range(pp - 1)]


@dataclass
class RankParams:
    """Parameter elements one GPU of a pipeline stage holds, split the ways memory needs."""

    by_part: Counter
    """part -> elements on this GPU."""
    dense: Counter
    """part -> elements of non-expert parameters (optimizer sharded over all DP ranks)."""
    expert: Counter
    """part -> elements of FFN-expert parameters (sharded over the expert-DP group)."""


def rank_params(cfg: NaViLModelConfig, parallel: ParallelConfig, stage: int) -> RankParams:
    """What one GPU of pipeline stage `stage` holds (any TP rank: splits are even)."""
    tp, ep = parallel.tensor_model_parallel_size, parallel.expert_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    layers = set(stage_layers(cfg.llm.num_layers, parallel)[stage])
    by_part, dense, expert = Counter(), Counter(), Counter()
    for p in inventory(cfg):
        if p.where == "first" and stage != 0:
            continue
        if p.where == "last" and stage != pp - 1:
            continue
        if p.where == "layer" and p.layer not in layers:
            continue
        n = p.numel // tp if p.tp_split else p.numel
        if p.expert:
            n = n / ep  # EP=2: each rank holds one of the two experts of every layer
            expert[p.part] += n
        else:
            dense[p.part] += n
        by_part[p.part] += n
    return RankParams(by_part, dense, expert)
