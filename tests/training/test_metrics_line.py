"""The step log line shows the model FLOP rate in a unit with digits: GFLOP/s below 1 TFLOP/s
(CPU runs printed `0.00 TFLOP/s` before), TFLOP/s on GPUs; the value is the record's, scaled."""

from __future__ import annotations

from megatron_navil.training.metrics import format_record

RECORD = {"step": 3, "loss": 2.5, "grad_norm": 0.5, "lr": 1e-4, "tokens_per_s": 900.0}


def test_cpu_rates_are_shown_in_gflops():
    line = format_record({**RECORD, "tflops_per_gpu": 0.0123, "mfu": None})
    assert "12.30 GFLOP/s" in line and "TFLOP/s" not in line and "MFU" not in line


def test_gpu_rates_stay_in_tflops_with_mfu():
    line = format_record({**RECORD, "tflops_per_gpu": 475.0, "mfu": 0.48})
    assert "475.00 TFLOP/s" in line and "MFU 48.0%" in line
