"""HF release <-> Megatron conversion as data: a mapping registry plus named transforms."""

from megatron_navil.conversion.convert import hf_to_megatron, megatron_to_hf
from megatron_navil.conversion.registry import ParamMapping, expand, mappings

__all__ = ["hf_to_megatron", "megatron_to_hf", "ParamMapping", "expand", "mappings"]
