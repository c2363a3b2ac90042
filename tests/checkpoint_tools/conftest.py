"""Shared helpers: tiny random NaViL HF directories, in-process CLI runs, file comparison."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch

from megatron_navil.config import get_flavor
from megatron_navil.reference import NaViLReference


def make_navil_hf(
    path: Path,
    flavor: str = "debug-qwen3",
    overrides: dict | None = None,
    seed: int = 0,
    max_shard_bytes: int = 400_000,
    dtype=None,
):
    """A random NaViL model in the HF layout, written by the library export; returns
    (config, reference model)."""
    from megatron_navil.conversion import export_hf, hf_to_megatron
    from megatron_navil.conversion.plan import padded_vocab

    cfg = get_flavor(flavor).apply_overrides(overrides or {})
    ref = NaViLReference(cfg).init_weights_(torch.Generator().manual_seed(seed))
    export_hf(
        hf_to_megatron(ref.state_dict(), cfg, padded_vocab(cfg)),
        path,
        cfg,
        max_shard_bytes=max_shard_bytes,
        dtype=dtype,
    )
    return cfg, ref


def load_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory, read with the safetensors library itself."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """navil-convert in this process: (exit code, stdout, stderr)."""
    from checkpoint_tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def same_files(a: Path, b: Path) -> list[str]:
    """Names of files that differ (or exist on one side only) between two directories."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [
        n
        for n in names
        if not (
            (a / n).exists() and (b / n).exists() and (a / n).read_bytes() == (b / n).read_bytes()
        )
    ]


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="module")
def navil(tmp_path_factory):
    """A small HF NaViL directory `hf` (one shard) and its Megatron checkpoint `ck`; shared by
    a module's tests, which must not modify them."""
    d = tmp_path_factory.mktemp("navil")
    make_navil_hf(d / "hf", "debug-qwen3", max_shard_bytes=10**9)
    assert run_cli(["hf-to-navil", "--hf", d / "hf", "--output", d / "ck", "--no-progress"])[0] == 0
    return d
