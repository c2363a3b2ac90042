"""HF-layout tensors -> a Megatron dist checkpoint root that `navil-pretrain --load` resumes from.

    ROOT/latest_checkpointed_iteration.txt        the step written (0 by default)
    ROOT/iter_0000000/                            torch_dist: loads at any TP/PP/EP
        navil_checkpoint.json                     step, model config, how it was converted
    ROOT/tokenizer/                               when the source has tokenizer files

Layout: the checkpoint is written from the canonical TP=1/PP=1/EP=1 layout. torch_dist stores
global tensors, so that file set is exactly what a save at any other layout produces (Megatron
reshards on load); the requested TP/PP/EP is validated against the model (every split must
divide) and recorded in the metadata. Building the model at the requested layout would need as
many processes and the whole model in memory, for the same bytes on disk.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_navil.checkpoint import FORMAT_VERSION, LATEST, METADATA, TOKENIZER_DIR, iteration_dir
from megatron_navil.checkpoint.dist_io import write_dist_checkpoint
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.config.parallel import ParallelConfig
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.layout import canonical_sharded_layout
from megatron_navil.conversion.outputs import check_free, staged, write_json
from megatron_navil.conversion.plan import Source, check_layout, check_source, pairs
from megatron_navil.conversion.tokenizer_files import (
    check_tokenizer,
    has_tokenizer,
    write_tokenizer_files,
)
from megatron_navil.utils.dtypes import dtype_name
from megatron_navil.utils.logging import get_logger
from megatron_navil.utils.progress import Progress

log = get_logger(__name__)


@dataclass
class ConversionReport:
    """What a conversion wrote and how fast."""

    output: Path
    tensors: int
    bytes: int
    seconds: float
    problems: tuple[str, ...] = ()
    """HF exports: what the released code would reject (release.check_release), one per line."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / max(self.seconds, 1e-9)


def write_megatron_checkpoint(
    source: Source,
    cfg: NaViLModelConfig,
    root: Path,
    *,
    step: int = 0,
    dtype: Optional[torch.dtype] = None,
    parallel: Optional[ParallelConfig] = None,
    tokenizer_dir: Optional[Path] = None,
    extra_metadata: Optional[dict] = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionReport:
    """Stream `source` (HF names, HF layout) into a Megatron checkpoint root at `root`."""
    start = time.perf_counter()
    check_free(Path(root), overwrite)
    src_dtype = check_source(source, cfg)
    dtype = dtype or src_dtype
    parallel = parallel or ParallelConfig()
    check_layout(cfg, parallel)
    if tokenizer_dir is not None and not has_tokenizer(tokenizer_dir):
        tokenizer_dir = None
    if tokenizer_dir is not None:
        check_tokenizer(tokenizer_dir, cfg.llm.first_special_token_id)
    layout = canonical_sharded_layout(cfg, dtype)
    by_name = {p.megatron: p for p in pairs(cfg)}
    drift = sorted(set(layout.params) ^ set(by_name))
    if drift:  # the registry and the Megatron model disagree: a bug, not a user error
        raise RuntimeError(f"registry and Megatron model disagree on {drift[:6]}")

    def produce(name: str) -> torch.Tensor:
        p = by_name[name]
        return p.transform.to_megatron([source.load(n).to(dtype) for n in p.hf])

    total = sum(math.prod(s) * d.itemsize for s, d in layout.params.values())
    with staged(Path(root), overwrite) as tmp:
        it = iteration_dir(tmp, step)
        bar = Progress(f"writing {Path(root).name}", total, "B", enabled=progress)
        write_dist_checkpoint(it, layout, produce, bar.update)
        bar.close()
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "model": cfg.to_dict(),
            "converted": {
                "source": source.describe(),
                "dtype": dtype_name(dtype),
                "model_only": True,
                "requested_layout": {
                    "tensor_model_parallel_size": parallel.tensor_model_parallel_size,
                    "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
                    "expert_model_parallel_size": parallel.expert_model_parallel_size,
                },
                **(extra_metadata or {}),
            },
        }
        write_json(it / METADATA, meta)
        (tmp / LATEST).write_text(str(step))
        if tokenizer_dir is not None:
            (tmp / TOKENIZER_DIR).mkdir()
            write_tokenizer_files(
                tokenizer_dir, tmp / TOKENIZER_DIR, cfg.llm.first_special_token_id
            )
    seconds = time.perf_counter() - start
    log.info(
        "wrote %s: %d tensors, %.2f GB in %.1f s", root, len(layout.params), total / 1e9, seconds
    )
    return ConversionReport(Path(root), len(layout.params), total, seconds)


def load_hf_config(hf_dir: Path, first_special_token_id: Optional[int] = None) -> NaViLModelConfig:
    """The model config of an HF NaViL directory (config.json, tokenizer files for ids)."""
    from megatron_navil.conversion.hf_config import from_hf_config
    from megatron_navil.conversion.outputs import read_json
    from megatron_navil.conversion.tokenizer_files import first_special_token_id as from_tokenizer

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a directory (expected an HF NaViL model directory)")
    d = read_json(hf_dir / "config.json", "an HF NaViL directory needs its config.json")
    first = first_special_token_id if first_special_token_id is not None else from_tokenizer(hf_dir)
    cfg = from_hf_config(d, first)
    ext = d.get("megatron_navil") or {}
    if first_special_token_id is not None and ext.get("first_special_token_id", first) != first:
        raise ConversionError(
            f"--first-special-token-id {first} contradicts {hf_dir / 'config.json'} "
            f"({ext['first_special_token_id']})"
        )
    return cfg


def import_hf(
    hf_dir: Path,
    root: Path,
    *,
    step: int = 0,
    dtype: Optional[torch.dtype] = None,
    parallel: Optional[ParallelConfig] = None,
    first_special_token_id: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = False,
    trust_pickle: bool = False,
) -> tuple[NaViLModelConfig, ConversionReport]:
    """An HF NaViL directory (config.json + safetensors) -> Megatron checkpoint root.
    `trust_pickle`: read `pytorch_model*.bin` when there are no safetensors (hf_weights.py)."""
    from megatron_navil.conversion.hf_weights import open_hf_weights

    cfg = load_hf_config(hf_dir, first_special_token_id)
    source = open_hf_weights(hf_dir, trust_pickle)
    report = write_megatron_checkpoint(
        source,
        cfg,
        root,
        step=step,
        dtype=dtype,
        parallel=parallel,
        tokenizer_dir=Path(hf_dir),
        overwrite=overwrite,
        progress=progress,
    )
    return cfg, report
