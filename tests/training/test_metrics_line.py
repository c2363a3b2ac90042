"""The step log line shows the model FLOP rate in a unit with digits: GFLOP/s below 1 TFLOP/s
(CPU runs printed `0.00 TFLOP/s` before), TFLOP/s on GPUs; the value is the record's, scaled.
MFU names the peak it is against (bf16, and FP8 for FP8 runs). `dp_imbalance` is the slowest
rank's FLOPs over the mean (the multi-process value is checked in test_pretrain.py)."""

from __future__ import annotations

import pytest

from megatron_navil.training.metrics import dp_imbalance, format_record

RECORD = {"step": 3, "loss": 2.5, "grad_norm": 0.5, "lr": 1e-4, "tokens_per_s": 900.0}


def test_cpu_rates_are_shown_in_gflops():
    line = format_record({**RECORD, "tflops_per_gpu": 0.0123, "mfu": None})
    assert "12.30 GFLOP/s" in line and "TFLOP/s" not in line and "MFU" not in line


def test_gpu_rates_stay_in_tflops_with_mfu():
    line = format_record({**RECORD, "tflops_per_gpu": 475.0, "mfu": 0.48})
    assert "475.00 TFLOP/s" in line and "MFU 48.0%" in line


def test_mfu_says_which_peak_and_fp8_runs_show_both():
    """An FP8 run's MFU against the bf16 peak alone would flatter it: both are shown, labelled."""
    line = format_record({**RECORD, "tflops_per_gpu": 600.0, "mfu": 0.6067, "mfu_fp8": 0.3032})
    assert "MFU 60.7% (bf16 peak)" in line and "MFU 30.3% (FP8 peak)" in line
    bf16 = format_record({**RECORD, "tflops_per_gpu": 475.0, "mfu": 0.48, "mfu_fp8": None})
    assert "(bf16 peak)" in bf16 and "FP8" not in bf16


def test_dp_imbalance_is_slowest_over_mean():
    # one process: the max over the world is this rank's; 2 DP ranks sharing 4.0 FLOPs
    assert dp_imbalance(3.0, 4.0, 2) == pytest.approx(0.5)
    assert dp_imbalance(2.0, 4.0, 2) == pytest.approx(0.0)
    assert dp_imbalance(0.0, 0.0, 2) == 0.0
