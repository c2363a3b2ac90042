"""The memory model on the GPU (prepared; runs on the GPU test machine).

benchmarks/scaling_gpu_memory.py trains navil-2b at reduced depth through the real Trainer
(bf16, Transformer Engine) and reads torch.cuda.max_memory_allocated; the memory each extra
LLM / ViT layer adds and the full-depth peak extrapolated from them must match the planner's
model (backend transformer_engine) within 15%: the allocator's caching does not count in
max_memory_allocated, but TE's workspaces and the cuDNN attention's softmax statistics are
not itemised in the model. Skipped without CUDA + Transformer Engine. The CPU test runs the
same script's --dry-run so its code path stays working between GPU sessions.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.launcher import ROOT


def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _te_available(), reason="needs CUDA and Transformer Engine")
def test_memory_model_matches_max_memory_allocated():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scaling_gpu_memory import compare, measure

    result = compare("navil-2b", measure("navil-2b", 4096, gpu=True), gpu=True)
    m, p = result["measured"], result["predicted"]
    for measured, predicted in [
        (m["per_llm_layer"], p["per_llm_layer"]),
        (m["per_vit_layer"], p["per_vit_layer"]),
        (m["full_depth_extrapolated"], p["full_depth"]),
    ]:
        assert measured == pytest.approx(predicted, rel=0.15), result


@pytest.mark.processes
@pytest.mark.slow
def test_the_gpu_script_runs_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/scaling_gpu_memory.py", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": "29757"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "scaling_gpu_memory.json").exists()
    assert (tmp_path / "layer_throughput.json").exists()
