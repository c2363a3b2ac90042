"""The memory model against the GPU, and a measured per-layer throughput table for the planner.

    PYTHONPATH=/tmp/site:. python benchmarks/scaling_gpu_memory.py --out $OUT    # GPU machine
    PYTHONPATH=. python benchmarks/scaling_gpu_memory.py --dry-run               # CPU: the logic

For navil-2b (bf16, Transformer Engine, one GPU, mock data through the real Trainer) it trains
two steps at reduced depth: (LLM 2, ViT 2), (LLM 4, ViT 2), (LLM 2, ViT 4) layers, reads
torch.cuda.max_memory_allocated of the second step, and takes the memory and time each extra
LLM or ViT layer adds. The full-depth peak is extrapolated linearly (every layer of a kind
costs the same) and compared with the planner's model for the same packs
(megatron_navil/scaling/memory.py, backend transformer_engine); the per-layer times give
model TFLOP/s per layer, written as benchmarks/layer_throughput.json rows the planner reads.
Writes <out>/scaling_gpu_memory.json; prints a table last. --dry-run uses the debug flavor on
CPU (no memory figures: the code path only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEPTHS = [(2, 2), (4, 2), (2, 4)]  # (LLM layers, ViT layers)


def _config(flavor: str, llm_layers: int, vit_layers: int, seq: int, gpu: bool):
    from megatron_navil.config.pretrain import PretrainConfig

    cfg = PretrainConfig(mock_data=True)
    return cfg.apply_overrides(
        {
            "model.flavor": flavor,
            "model.llm.num_layers": llm_layers,
            "model.vision.num_layers": vit_layers,
            "training.seq_length": seq,
            "training.global_batch_size": 1,
            "training.train_iters": 2,
            "precision.params_dtype": "bfloat16" if gpu else "float32",
            "precision.backend": "transformer_engine" if gpu else "local",
            "logging.progress_bar": "off",
        },
        parse=False,
    )


def measure(flavor: str, seq: int, gpu: bool) -> list[dict]:
    """Peak memory and step time of the second step at each reduced depth."""
    import torch

    from megatron_navil.scaling.memory import MicroBatch
    from megatron_navil.training.trainer import Trainer
    from megatron_navil.utils.distributed import destroy

    os.environ.setdefault("MASTER_PORT", "29755")
    out = []
    for llm_layers, vit_layers in DEPTHS:
        trainer = Trainer(_config(flavor, llm_layers, vit_layers, seq, gpu))
        trainer.train_step()  # first step: optimizer state appears
        peek = trainer.train_loader.state_dict()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train_step()
        if gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if gpu else None
        # the pack of the measured step, for the model's prediction
        trainer.train_loader.load_state_dict(peek)
        batch = next(trainer.train_loader)
        out.append(
            {
                "llm_layers": llm_layers,
                "vit_layers": vit_layers,
                "peak_bytes": peak,
                "step_s": dt,
                "micro_batch": MicroBatch.from_batch(trainer.model_cfg, batch).__dict__,
            }
        )
        del trainer
        destroy()
        if gpu:
            torch.cuda.empty_cache()
    return out


def compare(flavor: str, rows: list[dict], gpu: bool) -> dict:
    """Per-layer deltas, the extrapolated full-depth peak and the model's numbers."""
    from megatron_navil.config.flavors import get_flavor
    from megatron_navil.config.parallel import ParallelConfig
    from megatron_navil.scaling.memory import MicroBatch, stage_memory
    from megatron_navil.scaling.spec import WorkloadSpec
    from megatron_navil.training.flops import llm_flops, vision_flops

    full = get_flavor(flavor)
    w = WorkloadSpec(
        dtype="bfloat16" if gpu else "float32", backend="transformer_engine" if gpu else "local"
    )
    base, more_llm, more_vit = rows
    mb = MicroBatch(**base["micro_batch"])

    def predicted(llm_layers, vit_layers):
        cfg = full.apply_overrides(
            {"llm.num_layers": llm_layers, "vision.num_layers": vit_layers}, parse=False
        )
        return stage_memory(cfg, ParallelConfig(), w, 1, 0, 1, 1, False, mb).total

    result = {"flavor": flavor, "rows": rows}
    dt_llm = (more_llm["step_s"] - base["step_s"]) / 2
    dt_vit = (more_vit["step_s"] - base["step_s"]) / 2
    causal = mb.square_tokens / 2  # about sum len^2 / 2
    f_llm = 3 * llm_flops(full, mb.tokens, mb.visual, causal, 0.0, num_layers=1)
    one_vit = full.apply_overrides({"vision.num_layers": 1}, parse=False)
    no_vit = one_vit.apply_overrides({"vision.num_layers": 0}, parse=False)
    f_vit = 3 * (
        vision_flops(one_vit, mb.patches, mb.square_patches)
        - vision_flops(no_vit, mb.patches, mb.square_patches)
    )  # one encoder layer
    result["throughput_rows"] = [
        {"component": "llm", "width": full.llm.hidden_size, "tflops": f_llm / dt_llm / 1e12}
        if dt_llm > 0
        else None,
        {"component": "vision", "width": full.vision.hidden_size, "tflops": f_vit / dt_vit / 1e12}
        if dt_vit > 0
        else None,
    ]
    if gpu:
        d_llm = (more_llm["peak_bytes"] - base["peak_bytes"]) / 2
        d_vit = (more_vit["peak_bytes"] - base["peak_bytes"]) / 2
        full_peak = (
            base["peak_bytes"]
            + (full.llm.num_layers - 2) * d_llm
            + (full.vision.num_layers - 2) * d_vit
        )
        result["measured"] = {
            "per_llm_layer": d_llm,
            "per_vit_layer": d_vit,
            "full_depth_extrapolated": full_peak,
        }
        result["predicted"] = {
            "per_llm_layer": (predicted(4, 2) - predicted(2, 2)) / 2,
            "per_vit_layer": (predicted(2, 4) - predicted(2, 2)) / 2,
            "full_depth": predicted(full.llm.num_layers, full.vision.num_layers),
            **{f"llm{a}_vit{b}": predicted(a, b) for a, b in DEPTHS},
        }
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for results")
    p.add_argument("--dry-run", action="store_true", help="CPU, debug flavor: the code path")
    p.add_argument("--seq-length", type=int, default=4096)
    args = p.parse_args()
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    flavor, seq = ("navil-2b", args.seq_length) if gpu else ("debug-internlm2", 512)
    result = compare(flavor, measure(flavor, seq, gpu), gpu)
    result["device"] = torch.cuda.get_device_name() if gpu else "cpu (dry run)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling_gpu_memory.json").write_text(json.dumps(result, indent=1))
    rows = [r for r in result["throughput_rows"] if r]
    (out / "layer_throughput.json").write_text(
        json.dumps({"device": result["device"], "rows": rows}, indent=1)
    )
    print(f"{'':28}{'measured':>12}{'model':>12}")
    if gpu:
        m, pr = result["measured"], result["predicted"]
        for key, mk in [
            ("per LLM layer", "per_llm_layer"),
            ("per ViT layer", "per_vit_layer"),
            ("full depth (extrapolated)", "full_depth_extrapolated"),
        ]:
            pk = "full_depth" if mk == "full_depth_extrapolated" else mk
            print(f"{key:28}{m[mk] / 2**30:11.2f}G{pr[pk] / 2**30:11.2f}G")
    for r in rows:
        print(f"{r['component']} layer width {r['width']}: {r['tflops']:.3g} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
