"""The one map between dtype names (as configs, flags and checkpoint metadata spell them) and
torch dtypes. Every module that turns a name into a dtype or back goes through here."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Name -> dtype of the floating dtypes this stack stores and trains in."""
_NAMES = {v: k for k, v in DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The dtype called `name` (a ValueError naming the choices otherwise)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The name of `dtype` (a ValueError for one this stack does not store)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPES)}") from None
