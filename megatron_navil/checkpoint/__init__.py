"""The checkpoint format, owned in one place: what training saves and resumes, what conversion
reads and writes.

- format.py: the root layout (the `latest` pointer, iter_* dirs, metadata), resolve, prune.
- compat.py: whether a saved model config fits the model being built.
- keys.py: how model state is keyed in torch_dist (one key per parameter and expert).
- tokenizer.py: the tokenizer files a checkpoint carries and their digest.
- io.py: collective save / load with Megatron's dist_checkpointing (any TP/PP/EP/DP).
- dist_io.py: streaming, process-group-free torch_dist read/write (conversion, `--save-hf`).
- optimizer_keys.py: layout-free optimizer-state keys, matched across spellings on load.
- integrity.py: allow-list read of `.metadata`, file sizes and CRC32s, naming damaged files.
- safe_load.py: every unpickle of a load is weights-only.
Depends on config and utils only; training and conversion both import it.
"""

from megatron_navil.checkpoint.compat import check_model_config, model_config_diffs
from megatron_navil.checkpoint.format import (
    FORMAT_VERSION,
    LATEST,
    METADATA,
    TOKENIZER_DIR,
    CheckpointError,
    hf_export_dir,
    iteration_dir,
    prune,
    read_latest,
    read_metadata,
    resolve,
)
from megatron_navil.checkpoint.io import load, load_model, save
from megatron_navil.checkpoint.keys import (
    EXTRA_STATE,
    SHARDING_METADATA,
    load_model_state,
    model_sharded_state_dict,
)
from megatron_navil.checkpoint.tokenizer import TOKENIZER_FILES, tokenizer_digest

__all__ = [
    "FORMAT_VERSION",
    "LATEST",
    "METADATA",
    "TOKENIZER_DIR",
    "CheckpointError",
    "hf_export_dir",
    "iteration_dir",
    "prune",
    "read_latest",
    "read_metadata",
    "resolve",
    "check_model_config",
    "model_config_diffs",
    "load",
    "load_model",
    "save",
    "EXTRA_STATE",
    "SHARDING_METADATA",
    "load_model_state",
    "model_sharded_state_dict",
    "TOKENIZER_FILES",
    "tokenizer_digest",
]
