"""The weights of an HF directory: safetensors, or `pytorch_model*.bin` pickles only by consent.

A `.bin` checkpoint is a Python pickle (torch.save): unpickling a file from the internet can run
any code it names. navil-convert reads safetensors (a JSON header + raw bytes: nothing to
execute), and refuses a directory that only has `.bin` files with one line naming the file,
unless the user passes `--trust-pickle`. Even then the file is read with
`torch.load(weights_only=True)`, torch's restricted unpickler (tensors, plain containers and
numbers only), so a `.bin` holding any other object is still refused.

`PickleDir` has SafetensorsDir's reading interface (`names`, `info`, `load`, `in`). It maps the
files (torch.load(mmap=True)) and copies one tensor per `load`; the mapped pages it touched stay
resident while the directory is open, so peak memory grows towards the `.bin` size, unlike the
streaming safetensors reader: convert big `.bin` checkpoints to safetensors first.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.safetensors_io import SafetensorsDir, plain_file_name

PICKLE_INDEX = "pytorch_model.bin.index.json"
"""transformers' index of sharded `.bin` checkpoints (same `weight_map` as safetensors')."""
TO_SAFETENSORS = (
    "re-save it as safetensors (transformers: model.save_pretrained(dir, safe_serialization=True))"
)


def open_hf_weights(
    directory: Union[str, Path], trust_pickle: bool = False, flag: Optional[str] = "--trust-pickle"
) -> Union[SafetensorsDir, "PickleDir"]:
    """Safetensors when the directory has any; else its `.bin` files if `trust_pickle`; else a
    ConversionError naming the `.bin` file (`flag`: the option that would allow it, if any)."""
    d = Path(directory)
    if (
        not d.is_dir()
        or any(d.glob("*.safetensors"))
        or (d / "model.safetensors.index.json").exists()
    ):
        return SafetensorsDir(d)
    bins = sorted(d.glob("pytorch_model*.bin"))
    if not bins:
        return SafetensorsDir(d)  # names what is missing
    if not trust_pickle:
        allow = f", or pass {flag} to read it with torch.load(weights_only=True)" if flag else ""
        raise ConversionError(
            f"{bins[0]} is a pickle checkpoint (torch.save), which can run code when loaded; "
            f"safetensors are preferred: {TO_SAFETENSORS}{allow}"
        )
    return PickleDir(d)


class PickleDir:
    """All tensors of `pytorch_model*.bin` files (sharded with an index, or not)."""

    def __init__(self, directory: Union[str, Path]):
        self.dir = Path(directory)
        index = self.dir / PICKLE_INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({plain_file_name(index, n) for n in weight_map.values()})
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ConversionError(f"{index} is not a valid index (no weight_map)") from None
        else:
            files = sorted(p.name for p in self.dir.glob("pytorch_model*.bin"))
        self.tensors: dict[str, torch.Tensor] = {}
        self._file: dict[str, Path] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise ConversionError(f"{index} lists {name}, which is missing from {self.dir}")
            for key, t in _load(path).items():
                if key in self.tensors:
                    raise ConversionError(
                        f"tensor {key!r} is in both {self._file[key]} and {path}; remove the "
                        "duplicate shard"
                    )
                self.tensors[key], self._file[key] = t, path

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self.tensors[name]
        return tuple(t.shape), t.dtype

    def describe(self) -> str:
        return str(self.dir)

    def load(self, name: str) -> torch.Tensor:
        """One tensor, copied out of the mapped file (a fresh, owned, contiguous CPU tensor)."""
        return self.tensors[name].clone(memory_format=torch.contiguous_format)


def _load(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} state dict through torch's restricted (weights-only) unpickler."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy (non-zip) format cannot be mapped
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path} holds objects torch.load(weights_only=True) refuses ({why}): it is not a "
            f"plain state dict; {TO_SAFETENSORS} from a trusted copy"
        ) from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ConversionError(f"cannot read {path}: {type(e).__name__}: {e}"[:400]) from None
    bad = (
        [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if isinstance(sd, dict)
        else [type(sd).__name__]
    )
    if bad:
        raise ConversionError(f"{path} is not a flat state dict of tensors (at {bad[0]!r})")
    return sd
