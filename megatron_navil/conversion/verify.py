"""verify: a Megatron checkpoint and an HF NaViL directory give the same logits.

Megatron side: the NaViL Megatron-Core model (TP=1, one process) loaded with the trainer's own
loader (`checkpoint.load_model`). HF side: the plain-PyTorch reference in the HF layout
(`megatron_navil.reference`) with the directory's safetensors. Both run the same packed
inputs (generated: several samples, images of several grids, a text-only sample; or given in a
file) at every position that has logits (not `<IMG_CONTEXT>`), and we report the max absolute
logit difference and the mean KL(HF || Megatron) of the next-token distributions.

The two models are run one after the other (peak memory: one model). Both compute in float32
by default whatever the stored dtype, so a difference measures the conversion, not precision.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.conversion.errors import ConversionError

# Several samples, images of several grids (multi-scale), a text-only sample.
GENERATED_SAMPLES = [[8, [(2, 4), (4, 6)], 12], [24], [4, [(2, 2)], 6, [(4, 2)], 10]]
INPUT_KEYS = ("tokens", "position_ids", "cu_seqlens", "pixel_values", "grid_thw")


@dataclass
class VerifyResult:
    """Logit agreement of the two sides."""

    positions: int
    max_abs_diff: float
    mean_kl: float
    max_kl: float
    ok: bool
    tokenizer: str = "not checked"
    """The HF directory's tokenizer vs the one the checkpoint carries: "same", "differs: FILE",
    "missing: FILE" (both make the result not ok), or "not in the checkpoint"."""


def make_inputs(cfg: NaViLModelConfig, seq_length: int, seed: int) -> dict:
    from megatron_navil.data.synthetic import synthetic_batch

    need = sum(len(_tokens_of(cfg, s)) for s in GENERATED_SAMPLES)
    if seq_length < need:
        raise ConversionError(
            f"--seq-length {seq_length} is too short for the generated inputs (need >= {need})"
        )
    b = synthetic_batch(cfg, seq_length, torch.Generator().manual_seed(seed), GENERATED_SAMPLES)
    return {k: getattr(b, k) for k in INPUT_KEYS}


def _tokens_of(cfg, sample) -> list:
    from megatron_navil.data.layout import image_token_ids

    out = []
    for part in sample:
        out += [0] * part if isinstance(part, int) else image_token_ids(cfg, part)
    return out


def read_inputs(path: Path) -> dict:
    """A torch file with a dict: `tokens` [T] (required), `position_ids`, `cu_seqlens`,
    `pixel_values`, `grid_thw` (optional; one sample without images by default)."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise ConversionError(f"--inputs {path}: cannot read it as a torch file ({e})") from None
    if not isinstance(d, dict) or "tokens" not in d:
        raise ConversionError(f"--inputs {path} must hold a dict with at least 'tokens'")
    unknown = sorted(set(d) - set(INPUT_KEYS))
    if unknown:
        raise ConversionError(
            f"--inputs {path}: unknown keys {unknown}; allowed: {list(INPUT_KEYS)}"
        )
    t = d["tokens"].reshape(-1).long()
    return {
        "tokens": t,
        "position_ids": d.get("position_ids", torch.arange(t.numel())).long(),
        "cu_seqlens": d.get("cu_seqlens", torch.tensor([0, t.numel()])).to(torch.int32),
        "pixel_values": d.get("pixel_values"),
        "grid_thw": d.get("grid_thw"),
    }


def megatron_logits(checkpoint: Path, cfg: NaViLModelConfig, inputs: dict, dtype: torch.dtype):
    """(logits [n, V], rows) of the Megatron model (config `cfg`) loaded from `checkpoint`."""
    from megatron_navil.checkpoint import CheckpointError, load_model
    from megatron_navil.config.parallel import ParallelConfig, PrecisionConfig
    from megatron_navil.conversion.layout import ensure_single_process_world
    from megatron_navil.models.navil import NaViLModel
    from megatron_navil.utils.dtypes import dtype_name

    ensure_single_process_world()
    model = NaViLModel(
        cfg, ParallelConfig(), PrecisionConfig(backend="local", params_dtype=dtype_name(dtype))
    )
    try:
        load_model(checkpoint, [model], cfg)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    model.eval()
    with torch.no_grad():
        pv = inputs["pixel_values"]
        logits, rows = model(
            inputs["tokens"],
            inputs["position_ids"],
            inputs["cu_seqlens"],
            pixel_values=None if pv is None else pv.to(dtype),
            grid_thw=inputs["grid_thw"],
        )
    del model
    gc.collect()
    return logits[:, : cfg.llm.vocab_size].double(), rows


def reference_logits(
    hf_dir: Path, cfg: NaViLModelConfig, inputs: dict, rows: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    from megatron_navil.conversion.hf_weights import open_hf_weights
    from megatron_navil.conversion.plan import check_source
    from megatron_navil.reference import NaViLReference

    source = open_hf_weights(hf_dir, flag=None)  # a .bin is refused with its name
    check_source(source, cfg)
    with torch.device("meta"):
        ref = NaViLReference(cfg)
    ref = ref.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for name, p in ref.state_dict(keep_vars=True).items():
            p.copy_(source.load(name))
        pv = inputs["pixel_values"]
        logits = ref(
            inputs["tokens"],
            inputs["position_ids"],
            inputs["cu_seqlens"],
            None if pv is None else pv.to(dtype),
            inputs["grid_thw"],
        )
    return logits[rows].double()


def compare(a: torch.Tensor, b: torch.Tensor, atol: float, max_kl: float) -> VerifyResult:
    """a = reference (HF) logits, b = Megatron logits, both [n, V]."""
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (la.exp() * (la - lb)).sum(-1).clamp_min(0.0)
    mean_kl = kl.mean().item() if kl.numel() else 0.0
    worst = kl.max().item() if kl.numel() else 0.0
    ok = math.isfinite(diff) and diff <= atol and worst <= max_kl
    return VerifyResult(a.shape[0], diff, mean_kl, worst, ok)


def verify(
    checkpoint: Path,
    hf_dir: Path,
    inputs_path: Optional[Path] = None,
    *,
    seq_length: int = 128,
    seed: int = 0,
    atol: float = 1e-3,
    max_kl: float = 1e-5,
    dtype: torch.dtype = torch.float32,
) -> VerifyResult:
    from megatron_navil.checkpoint import CheckpointError, model_config_diffs, read_metadata
    from megatron_navil.conversion.to_megatron import load_hf_config

    hf_cfg = load_hf_config(hf_dir)
    try:
        saved = read_metadata(checkpoint)["model"]
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    diffs = model_config_diffs(saved, hf_cfg)
    if diffs:
        raise ConversionError(
            f"config mismatch: {checkpoint} and {hf_dir}/config.json describe "
            f"different models ({'; '.join(diffs)}); compare a checkpoint with its "
            "own conversion"
        )
    cfg = NaViLModelConfig.from_dict(saved)
    inputs = read_inputs(inputs_path) if inputs_path else make_inputs(cfg, seq_length, seed)
    meg, rows = megatron_logits(checkpoint, cfg, inputs, dtype)
    ref = reference_logits(hf_dir, hf_cfg, inputs, rows, dtype)
    result = compare(ref, meg, atol, max_kl)
    result.tokenizer = compare_tokenizers(checkpoint, hf_dir)
    result.ok = result.ok and result.tokenizer in ("same", "not in the checkpoint")
    return result


# Files that define the vocabulary (the export adds special tokens to the others).
_VOCAB_FILES = ("tokenizer.model", "vocab.json", "merges.txt")


def compare_tokenizers(checkpoint: Path, hf_dir: Path) -> str:
    """The tokenizer the checkpoint carries (navil-pretrain's copy, or navil-convert's) vs the
    HF directory's, by the bytes of the files that define the vocabulary."""
    from megatron_navil.checkpoint import resolve
    from megatron_navil.conversion.to_hf import checkpoint_tokenizer

    own = checkpoint_tokenizer(resolve(checkpoint))
    names = [n for n in _VOCAB_FILES if (own / n).is_file()]
    if not names:
        return "not in the checkpoint"
    for n in names:
        if not (Path(hf_dir) / n).is_file():
            return f"missing: {n}"
        if (Path(hf_dir) / n).read_bytes() != (own / n).read_bytes():
            return f"differs: {n}"
    return "same"
