"""Megatron weights -> an HF NaViL directory in the released layout (the export library call).

    OUT/config.json                               navil_chat fields, vision_config, llm_config
    OUT/model-0000i-of-0000n.safetensors          released key names and layouts
    OUT/model.safetensors.index.json
    OUT/tokenizer files                           with the 12 special tokens registered
    OUT/generation_config.json
    OUT/configuration_navil_chat.py, ...          only with `modeling_code` (offline clusters)
The directory is then checked against the released code's constraints (release.check_release);
the report lists what would fail there.

`export_hf` is what `navil-convert navil-to-hf` and `navil-pretrain --save-hf` call. It reads a
saved checkpoint one parameter at a time through torch.distributed.checkpoint without a process
group, so a trainer can call it on ONE rank (rank 0) after `checkpoint.save` returned on all
ranks, whatever TP/PP/EP the job runs at; memory stays at about one parameter.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from megatron_navil.checkpoint import TOKENIZER_DIR
from megatron_navil.checkpoint.dist_io import TRIM_BYTES
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.hf_config import to_hf_config
from megatron_navil.conversion.outputs import check_free, staged, write_json
from megatron_navil.conversion.plan import hf_shapes, megatron_shapes, pairs
from megatron_navil.conversion.release import check_release
from megatron_navil.conversion.released import CODE_FILES, GENERATION_CONFIG
from megatron_navil.conversion.safetensors_io import DEFAULT_SHARD_BYTES, ShardedSafetensorsWriter
from megatron_navil.conversion.to_megatron import ConversionReport
from megatron_navil.conversion.tokenizer_files import (
    check_tokenizer,
    has_tokenizer,
    write_tokenizer_files,
)
from megatron_navil.utils.logging import get_logger
from megatron_navil.utils.memory import release_freed_memory
from megatron_navil.utils.progress import Progress

log = get_logger(__name__)
Weights = Union[str, Path, Mapping[str, torch.Tensor], list]


def _from_checkpoint(path: Path, model_cfg: Optional[NaViLModelConfig]):
    """(config, reader(name) -> tensor, dtype(name), tokenizer dir) of a saved checkpoint."""
    from megatron_navil.checkpoint import (
        CheckpointError,
        check_model_config,
        read_metadata,
        resolve,
    )
    from megatron_navil.checkpoint.dist_io import DistCheckpointReader

    try:
        it = resolve(path)
        meta = read_metadata(it)
        saved = NaViLModelConfig.from_dict(meta["model"])
        if model_cfg is not None:
            check_model_config(meta["model"], model_cfg, it)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    except (KeyError, ValueError) as e:
        raise ConversionError(
            f"{it}/navil_checkpoint.json has no usable model config ({e})"
        ) from None
    cfg = model_cfg or saved
    reader = DistCheckpointReader(it)
    _check_stored_keys(reader, cfg)
    return (
        cfg,
        (lambda n: reader.load([n])[n]),
        (lambda n: reader.info(n)[1]),
        checkpoint_tokenizer(it),
    )


def checkpoint_tokenizer(iteration: Path) -> Path:
    """The tokenizer a checkpoint carries: `iter_*/tokenizer` (navil-pretrain copies the one it
    trains with into every checkpoint), else the root's (navil-convert's imports write it there)."""
    own = iteration / TOKENIZER_DIR
    root = iteration.parent if iteration.name.startswith("iter_") else iteration
    return own if has_tokenizer(own) else root / TOKENIZER_DIR


def _check_stored_keys(reader, cfg: NaViLModelConfig) -> None:
    """Every stored model tensor is used, at the model's shapes; else name the key."""
    want = megatron_shapes(cfg)
    used: set[str] = set()
    for name, shape in want.items():
        got, _ = reader.info(name)
        if tuple(got) != shape:
            raise ConversionError(
                f"{reader.dir}: {name} is stored as {list(got)}, the model config "
                f"in navil_checkpoint.json needs {list(shape)}"
            )
        used.update(reader.parts(name))
    extra = sorted(set(reader.tensor_keys()) - used)
    if extra:
        raise ConversionError(
            f"{reader.dir} holds {', '.join(extra[:6])}, which the NaViL registry "
            "does not map; the checkpoint does not match its model config"
        )


def _from_state_dict(state: Mapping[str, torch.Tensor], cfg: NaViLModelConfig):
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    want = megatron_shapes(cfg)
    odd = sorted(set(state) ^ set(want))
    if odd:
        what = "lacks" if odd[0] in want else "has unmapped"
        raise ConversionError(f"the Megatron state dict {what} {odd[0]} ({len(odd)} key(s) differ)")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise ConversionError(
                f"{name} has shape {list(state[name].shape)}, the model needs {list(shape)}"
            )
    return (lambda n: state[n].detach().cpu()), (lambda n: state[n].dtype)


def _modeling_files(code_dir: Optional[Union[str, Path]]) -> list[Path]:
    """The released code's Python files in `code_dir` (refused if it lacks the entry points)."""
    if code_dir is None:
        return []
    code_dir = Path(code_dir)
    missing = [n for n in CODE_FILES if not (code_dir / n).is_file()]
    if missing:
        raise ConversionError(
            f"--modeling-code {code_dir} lacks {', '.join(missing)}; point it at a "
            "copy of the released NaViL-2B (InternLM2) or NaViL-9B (Qwen3) code"
        )
    return sorted(code_dir.glob("*.py"))


def export_hf(
    weights: Weights,
    out_dir: Union[str, Path],
    model_cfg: Optional[NaViLModelConfig] = None,
    tokenizer_dir: Optional[Union[str, Path]] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = False,
    modeling_code: Optional[Union[str, Path]] = None,
) -> ConversionReport:
    """Write an HF NaViL directory at `out_dir`.

    `weights`: a checkpoint root or `iter_*` directory (any TP/PP/EP; `model_cfg` optional, taken
    from its navil_checkpoint.json, and checked against it when given), or canonical Megatron
    weights in memory: a state dict, or the model chunks of an unsharded (TP=PP=EP=1) model
    (`model_cfg` required). `tokenizer_dir`: tokenizer files to include (default: the
    checkpoint's `tokenizer/`: the one navil-pretrain saved with it, else the checkpoint
    root's). `dtype`: of the written tensors (default: as stored). `modeling_code`: a local copy
    of the released NaViL code to copy in (auto_map then names the local files; default: the
    family's hub repository). Raises ConversionError for anything the caller can fix; what the
    released code would reject is returned in `report.problems`.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    check_free(out_dir, overwrite)
    code_files = _modeling_files(modeling_code)
    default_tok = None
    if isinstance(weights, (str, Path)):
        cfg, load, dtype_of, default_tok = _from_checkpoint(Path(weights), model_cfg)
    else:
        if model_cfg is None:
            raise ConversionError("export_hf from in-memory weights needs model_cfg")
        cfg = model_cfg
        if isinstance(weights, list):
            weights = _unsharded_state_dict(weights)
        load, dtype_of = _from_state_dict(weights, cfg)
    tok = Path(tokenizer_dir) if tokenizer_dir is not None else default_tok
    if tok is not None and (tokenizer_dir is not None or has_tokenizer(tok)):
        check_tokenizer(tok, cfg.llm.first_special_token_id)  # fail before writing, not after
    else:
        tok = None

    shapes = hf_shapes(cfg)
    plan_pairs = pairs(cfg)
    out_dtype = lambda p: dtype or dtype_of(p.megatron)  # noqa: E731
    plan = [(n, out_dtype(p), shapes[n]) for p in plan_pairs for n in p.hf]
    with staged(out_dir, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, plan, max_shard_bytes)
        bar = Progress(f"writing {out_dir.name}", writer.total_bytes, "B", enabled=progress)
        try:
            for p in plan_pairs:
                nbytes = 0
                for name, t in zip(p.hf, p.transform.to_hf(load(p.megatron))):
                    nbytes += writer.write(name, t.to(out_dtype(p)))
                bar.update(nbytes)
                if nbytes >= TRIM_BYTES:
                    release_freed_memory()
            writer.close()
        except BaseException:
            writer.abort()
            raise
        bar.close()
        dtype_name = str(plan[0][1]).replace("torch.", "")
        write_json(tmp / "config.json", to_hf_config(cfg, dtype_name, local_code=bool(code_files)))
        write_json(tmp / "generation_config.json", GENERATION_CONFIG)
        for f in code_files:
            shutil.copyfile(f, tmp / f.name)
        if tok is not None:
            write_tokenizer_files(tok, tmp, cfg.llm.first_special_token_id)
        problems = tuple(check_release(tmp))
    seconds = time.perf_counter() - start
    log.info(
        "exported %s: %d tensors, %.2f GB in %.1f s",
        out_dir,
        len(plan),
        writer.total_bytes / 1e9,
        seconds,
    )
    for line in problems:
        log.warning("release check: %s", line)
    return ConversionReport(out_dir, len(plan), writer.total_bytes, seconds, problems)


def _unsharded_state_dict(chunks: list) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state

    sharded = parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_world_size() > 1
        or parallel_state.get_pipeline_model_parallel_world_size() > 1
        or parallel_state.get_expert_model_parallel_world_size() > 1
    )
    if sharded or len(chunks) != 1:
        raise ConversionError(
            "export_hf from model chunks needs an unsharded model (TP=PP=EP=1, "
            "no virtual pipeline); pass the saved checkpoint directory instead"
        )
    m = chunks[0]
    return (m.module if hasattr(m, "module") else m).state_dict()
