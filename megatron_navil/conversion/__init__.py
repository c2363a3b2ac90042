"""HF release <-> Megatron conversion: a mapping registry plus named transforms (as data), the
HF config.json mapping, and streaming converters in both directions.

- `hf_to_megatron`: a whole HF state dict in memory -> canonical Megatron (tests, small models).
- `export_hf(weights, out_dir, model_cfg=None, tokenizer_dir=None, ...)`: Megatron checkpoint
  (any TP/PP/EP) or in-memory weights -> HF NaViL directory, streaming (`--save-hf` calls it).
- `import_hf(hf_dir, root, ...)`: HF NaViL directory -> Megatron checkpoint root, streaming.
- `to_hf_config` / `from_hf_config`: NaViLModelConfig <-> config.json.
"""

from megatron_navil.conversion.convert import hf_to_megatron
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.hf_config import from_hf_config, to_hf_config
from megatron_navil.conversion.registry import ParamMapping, expand, mappings
from megatron_navil.conversion.to_hf import export_hf
from megatron_navil.conversion.to_megatron import (
    ConversionReport,
    import_hf,
    load_hf_config,
    write_megatron_checkpoint,
)

__all__ = [
    "hf_to_megatron",
    "ParamMapping",
    "expand",
    "mappings",
    "ConversionError",
    "from_hf_config",
    "to_hf_config",
    "export_hf",
    "import_hf",
    "load_hf_config",
    "write_megatron_checkpoint",
    "ConversionReport",
]
