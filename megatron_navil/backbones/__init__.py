"""The LLM families a NaViL model can be built on, one file each (see base.py).

Adding a family: write `<name>.py` defining `BACKBONE = Backbone(...)` and list it in FAMILIES.
"""

from __future__ import annotations

from typing import Optional

from megatron_navil.backbones import internlm2, qwen3
from megatron_navil.backbones.base import Backbone, LLMNames, QKVLayout, expert_name

FAMILIES: dict[str, Backbone] = {b.name: b for b in (internlm2.BACKBONE, qwen3.BACKBONE)}
"""Every supported family by its `llm.backbone` name."""

BACKBONE_NAMES = tuple(FAMILIES)
"""The admissible values of `llm.backbone` (the config type is `Literal[BACKBONE_NAMES]`)."""


def get_backbone(name: str) -> Backbone:
    """The family called `name`; KeyError names the supported ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(
            f"unknown LLM backbone {name!r}; supported: {', '.join(BACKBONE_NAMES)}"
        ) from None


def identify(hf_llm_config: dict) -> Optional[Backbone]:
    """The family of an HF LLM config (plain or a NaViL llm_config), None when unsupported."""
    return next((b for b in FAMILIES.values() if b.matches(hf_llm_config)), None)


def by_template(template: Optional[str]) -> Optional[Backbone]:
    """The family whose NaViL conversation template (or chat style) is `template`."""
    return next((b for b in FAMILIES.values() if template in (b.template, b.chat_style)), None)


def by_released_architecture(architecture: Optional[str]) -> Optional[Backbone]:
    """The family whose released llm_config names `architecture`."""
    return next((b for b in FAMILIES.values() if b.released_architecture == architecture), None)


__all__ = [
    "BACKBONE_NAMES",
    "FAMILIES",
    "Backbone",
    "LLMNames",
    "QKVLayout",
    "by_released_architecture",
    "by_template",
    "expert_name",
    "get_backbone",
    "identify",
]
