"""The tokenizer a checkpoint carries (`iter_*/tokenizer/`) and the digest resume compares.

`TOKENIZER_FILES` is the one list of file names that make up a tokenizer directory (the
sentencepiece / BPE files, HF configs, NaViL's metadata, InternLM2's tokenizer code): training
copies them into each checkpoint and the HF export copies them into a release.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Union

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "navil_tokenizer.json",
    "tokenization_internlm2.py",
    "tokenization_internlm2_fast.py",
)


def tokenizer_source(path: Union[str, Path]) -> Path:
    """The directory of a tokenizer given as a directory or as one of its files."""
    path = Path(path)
    return path.parent if path.is_file() else path


def tokenizer_file_names(directory: Path) -> list[str]:
    """The tokenizer files (TOKENIZER_FILES) present in `directory`."""
    return [n for n in TOKENIZER_FILES if (directory / n).is_file()]


def tokenizer_digest(directory: Union[str, Path]) -> str:
    """sha256 over the names and bytes of a tokenizer directory's files (what resume compares)."""
    d, h = tokenizer_source(directory), hashlib.sha256()
    for name in tokenizer_file_names(d):
        h.update(name.encode() + b"\0" + (d / name).read_bytes())
    return h.hexdigest()


def copy_tokenizer(src: Union[str, Path], dest: Path) -> None:
    """Copy the tokenizer files of `src` (a directory or one of its files) into `dest`."""
    src = tokenizer_source(src)
    dest.mkdir(exist_ok=True)
    for name in tokenizer_file_names(src):
        shutil.copyfile(src / name, dest / name)
