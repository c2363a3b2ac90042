"""Typed configs: model (vision, connector, LLM, experts), parallel layout, precision, flavors."""

from megatron_navil.config.base import ConfigBase, ConfigError, field_docs
from megatron_navil.config.flavors import (
    FLAVORS,
    get_flavor,
    propose_vision_config,
    propose_vision_size,
)
from megatron_navil.config.model import (
    IMG_CONTEXT,
    IMG_END,
    IMG_FRAME_BREAK,
    IMG_LINE_BREAK,
    IMG_START,
    SPECIAL_TOKENS,
    ConnectorConfig,
    ExpertConfig,
    LLMConfig,
    NaViLModelConfig,
    VisionConfig,
)
from megatron_navil.config.parallel import ParallelConfig, PrecisionConfig

__all__ = [
    "ConfigBase",
    "ConfigError",
    "field_docs",
    "FLAVORS",
    "get_flavor",
    "propose_vision_config",
    "propose_vision_size",
    "IMG_CONTEXT",
    "IMG_END",
    "IMG_FRAME_BREAK",
    "IMG_LINE_BREAK",
    "IMG_START",
    "SPECIAL_TOKENS",
    "ConnectorConfig",
    "ExpertConfig",
    "LLMConfig",
    "NaViLModelConfig",
    "VisionConfig",
    "ParallelConfig",
    "PrecisionConfig",
]
