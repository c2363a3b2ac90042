"""Per-step metrics: console (tqdm bar or log lines), TensorBoard, JSONL.

Every rank calls `StepMetrics.gather` (one small all-reduce); only global rank 0 writes.
JSONL fields (one object per step; documented in README):
    step, loss, grad_norm, lr, tokens_per_s, samples_per_s, tflops_per_gpu,
    padded_tflops_per_gpu, mfu, mfu_fp8, dp_imbalance, step_time_s, num_tokens, num_samples,
    skipped_images, skipped_steps, mem_gb, valid_loss
`loss` is the mean next-token CE over the step's counted text tokens (all DP ranks).
`tflops_per_gpu` counts model FLOPs (convention: training/flops.py; padding out, frozen parts'
weight gradients out); `padded_tflops_per_gpu` the same with the padding tokens in. `mfu` is
against the dense bf16 peak, null when it is unknown (CPU without logging.peak_tflops); `mfu_fp8`
against the dense FP8 peak, only for FP8 runs.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_navil.config.training import LoggingConfig
from megatron_navil.utils.distributed import is_rank0
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


def reduce_step_sums(loss_reports: list[dict], extras: list[float]) -> list[float]:
    """[loss_sum, counted_tokens, *extras] summed over the world, with the TP/PP duplication
    of the loss removed (every TP rank of the last stage reports the same loss)."""
    loss_sum = sum(float(r["lm loss"][0]) for r in loss_reports)
    tokens = sum(float(r["lm loss"][1]) for r in loss_reports)
    t = torch.tensor([loss_sum, tokens, *extras], dtype=torch.float64)
    if torch.distributed.is_initialized():
        t = t.to(torch.cuda.current_device()) if torch.cuda.is_available() else t
        torch.distributed.all_reduce(t)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        t[:2] /= tp
        # extras are per model-parallel group (e.g. tokens of this DP rank): de-duplicate.
        t[2:] /= tp * parallel_state.get_pipeline_model_parallel_world_size()
    return t.cpu().tolist()


def dp_imbalance(local_flops: float, flops_all: float, dp_size: int) -> float:
    """Slowest DP rank's model FLOPs this step over the mean DP rank's, minus 1 (0 = every rank
    had the same work; what balanced dealing, data/dealing.py, keeps small). `flops_all` is the
    de-duplicated sum over DP ranks (reduce_step_sums); TP/PP peers of a DP rank hold the same
    batches, so the max over the world is the max over DP ranks. One more tiny all-reduce."""
    t = torch.tensor([local_flops], dtype=torch.float64)
    if torch.distributed.is_initialized():
        t = t.to(torch.cuda.current_device()) if torch.cuda.is_available() else t
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    mean = flops_all / max(dp_size, 1)
    return float(t.item()) / mean - 1.0 if mean > 0 else 0.0


class MetricsWriter:
    """Rank 0's sink of step records: JSONL metrics file, TensorBoard, and a log line or tqdm
    bar (the other ranks write nothing)."""

    def __init__(self, cfg: LoggingConfig, total_steps: int, start_step: int):
        self.cfg = cfg
        self.active = is_rank0()
        self.file = self.tb = self.bar = None
        if not self.active:
            return
        if cfg.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.metrics_file)), exist_ok=True)
            self.file = open(cfg.metrics_file, "a")
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.tensorboard_dir)
        interactive = sys.stderr.isatty()
        if cfg.progress_bar == "on" or (cfg.progress_bar == "auto" and interactive):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        step = record["step"]
        if self.file:
            self.file.write(json.dumps(_jsonable(record)) + "\n")
            self.file.flush()
        if self.tb:
            for k, v in record.items():
                if (
                    k != "step"
                    and isinstance(v, (int, float))
                    and v is not None
                    and math.isfinite(v)
                ):
                    self.tb.add_scalar(f"train/{k}" if k != "valid_loss" else "valid/loss", v, step)
        line = format_record(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(line, refresh=False)
        elif step % self.cfg.log_interval == 0 or "valid_loss" in record:
            log.info("step %d | %s", step, line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _jsonable(record: dict) -> dict:
    out = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None if math.isnan(v) else str(v)
        out[k] = v
    return out


def _rate(tflops: float) -> str:
    """Model FLOP rate per device in a unit that shows digits: TFLOP/s on GPUs, GFLOP/s where
    a step reaches less than 1 TFLOP/s (CPU runs, which printed `0.00 TFLOP/s`)."""
    return f"{tflops:.2f} TFLOP/s" if tflops >= 1.0 else f"{tflops * 1e3:.2f} GFLOP/s"


def format_record(r: dict) -> str:
    """The human line of one step's record (the log line and the progress bar's postfix)."""
    parts = [f"loss {r['loss']:.4f}" if r.get("loss") is not None else "loss -"]
    if r.get("valid_loss") is not None:
        parts.append(f"valid {r['valid_loss']:.4f}")
    parts += [
        f"gnorm {r['grad_norm']:.3f}" if r.get("grad_norm") is not None else "gnorm -",
        f"lr {r['lr']:.2e}",
        f"{r['tokens_per_s']:.0f} tok/s",
        _rate(r["tflops_per_gpu"]),
    ]
    # Say which peak: an FP8 run's MFU against the bf16 peak alone would flatter it.
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}% (bf16 peak)")
    if r.get("mfu_fp8") is not None:
        parts.append(f"MFU {100 * r['mfu_fp8']:.1f}% (FP8 peak)")
    if r.get("skipped_images"):
        parts.append(f"skipped img {r['skipped_images']}")
    if r.get("skipped_steps"):
        parts.append(f"skipped steps {r['skipped_steps']}")
    return " | ".join(parts)


def memory_gb() -> Optional[float]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:
        return None
