"""Training stages: which model parts train, and their learning-rate multiples.

Parts: `vision` (encoder), `connector`, `visual_experts` (every *visual* weight of the LLM:
QKV/output projections, q/k norms and the visual FFN expert), `special_tokens` (the 12-row
special-token embedding) and `text` (everything else of the LLM). Frozen parameters get
requires_grad=False BEFORE Megatron DDP and the optimizer are built, so they take no gradient
buffer and no optimizer state.
"""

from __future__ import annotations

from collections import Counter

import torch
from megatron.core.optimizer import ParamGroupOverride, ParamKey, ParamPredicate

from megatron_navil.config.training import PARTS, OptimizerSettings, StageConfig
from megatron_navil.models.modality import VISUAL
from megatron_navil.models.moe import ModalityMoELayer

PART_ATTR = "navil_part"


def _expert_part(moe: ModalityMoELayer) -> dict[int, str]:
    """id(param) -> part for one MoE layer's experts (local index -> global expert index)."""
    out = {}
    experts = moe.experts
    for name, p in experts.named_parameters():
        if name.startswith("local_experts."):  # SequentialMLP: local_experts.{i}.*
            local = int(name.split(".")[1])
        else:  # TEGroupedMLP: linear_fc{1,2}.weight{i}
            local = int(name.rsplit("weight", 1)[1])
        out[id(p)] = "visual_experts" if moe.local_expert_indices[local] == VISUAL else "text"
    return out


def classify(chunk: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> part, for one model chunk (unwrapped NaViLModel)."""
    expert_parts = {}
    for module in chunk.modules():
        if isinstance(module, ModalityMoELayer):
            expert_parts.update(_expert_part(module))
    parts = {}
    for name, p in chunk.named_parameters():
        if name.startswith("vision_model."):
            part = "vision"
        elif name.startswith("connector."):
            part = "connector"
        elif "special_token_embedding" in name:
            part = "special_tokens"
        elif id(p) in expert_parts:
            part = expert_parts[id(p)]
        elif ".visual." in name:
            part = "visual_experts"
        else:
            part = "text"
        parts[name] = part
    return parts


def experts_trainable(stage: StageConfig) -> tuple[bool, bool]:
    """(text FFN expert, visual FFN expert) trained by `stage`; the model picks its experts
    module from this (models/backends.use_grouped_experts)."""
    return stage.trains("text"), stage.trains("visual_experts")


def check_grouped_experts(chunks: list) -> None:
    """Refuse a frozen/trained mix inside one grouped expert GEMM.

    A TE GroupedLinear (parameters weight0, weight1, ...) computes all its weight gradients or
    none, from weight0's requires_grad; build the model with `experts_trainable(stage)` so a
    stage that freezes one expert gets separate expert linears instead."""
    for chunk in chunks:
        for name, module in chunk.named_modules():
            flags = {
                n: p.requires_grad
                for n, p in module.named_parameters(recurse=False)
                if n.startswith("weight") and n[len("weight") :].isdigit()
            }
            if len(set(flags.values())) > 1:
                raise ValueError(
                    f"{name} holds grouped expert weights of which only some train "
                    f"({', '.join(f'{n}={v}' for n, v in sorted(flags.items()))}); Transformer "
                    "Engine's GroupedLinear would skip the trained ones' gradients. Build the "
                    "model with experts_trainable=experts_trainable(stage)"
                )


def apply_stage(chunks: list, stage: StageConfig) -> Counter:
    """Tag every parameter with its part and freeze the parts the stage does not train.

    Returns the number of trainable parameters per part (this rank's shards)."""
    stage.validate()
    trainable = Counter()
    for chunk in chunks:
        named = dict(chunk.named_parameters())
        for name, part in classify(chunk).items():
            p = named[name]
            setattr(p, PART_ATTR, part)
            p.requires_grad_(stage.trains(part))
            if p.requires_grad:
                trainable[part] += p.numel()
    check_grouped_experts(chunks)
    return trainable


def lr_overrides(stage: StageConfig, opt: OptimizerSettings) -> dict:
    """Megatron optimizer `config_overrides`: per-part max/min LR, plus the standard rule of no
    weight decay on norms and biases (which passing overrides would otherwise drop)."""
    overrides = {
        ParamKey(
            name="*.bias",
            predicate=ParamPredicate(name="param_len_1", fn=lambda p: len(p.shape) == 1),
        ): ParamGroupOverride(wd_mult=0.0),
    }
    for part in PARTS:
        mult = stage.lr_mult(part)
        if mult != 1.0:
            key = ParamKey(
                predicate=ParamPredicate(
                    name=f"part_{part}", fn=lambda p, part=part: getattr(p, PART_ATTR, None) == part
                )
            )
            overrides[key] = ParamGroupOverride(max_lr=opt.lr * mult, min_lr=opt.min_lr * mult)
    return overrides
