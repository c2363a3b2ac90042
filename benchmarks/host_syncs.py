"""Host syncs and pageable host->device copies per micro-batch, data.host_pack_metadata on / off.

    PYTHONPATH=. python benchmarks/host_syncs.py --results benchmarks/host_syncs_results.json

One training micro-batch (training.step.forward_step: batch.to(device), the model, the loss;
then backward) of the debug flavors on the trainer's mock packs (MockPackLoader: 2-3 samples,
images of 36 to 128 patches, a text-only pack), counted by megatron_navil/utils/host_syncs.py:
the calls that would block the host on a GPU. Runs on the CPU with the local backend: the
counter takes model inputs, parameters and gradients for device tensors, so the count is the
GPU run's for the same Python path (the TE backend's attention takes cu_seqlens + max_seqlen
and has no per-layer read either way). `step_host_syncs` is the per-micro-batch count for the
GPU step benchmark's "host syncs per micro-batch" column. Each call is listed with its file:line
in the results JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform

import torch

VARIANTS = {
    "debug-internlm2": ("debug-internlm2", {}),
    "debug-qwen3+window": (
        "debug-qwen3",
        {"vision.window_size": 64, "vision.fullatt_block_indexes": [1]},
    ),
}


def step_host_syncs(model, batch) -> dict:
    """Counts for one micro-batch of the training step (forward_step + backward)."""
    from megatron_navil.training.step import forward_step
    from megatron_navil.utils.host_syncs import HostSyncCounter

    model.zero_grad(set_to_none=True)
    with HostSyncCounter() as c:
        output, loss_fn = forward_step(iter([batch]), model)
        loss_sum, num_tokens, _ = loss_fn(output)
        (loss_sum / num_tokens).backward()
    return {"syncs": len(c.syncs), "h2d": len(c.h2d), "sites": c.by_site()}


def run(packs: int, seq_length: int) -> list[dict]:
    from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
    from megatron_navil.models.navil import NaViLModel
    from megatron_navil.training.data import MockPackLoader

    rows = []
    for name, (flavor, overrides) in VARIANTS.items():
        cfg = get_flavor(flavor).apply_overrides(overrides)
        model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())
        loader = MockPackLoader(cfg, seq_length, 1234, 0, 1, pack_metadata=True)
        for i in range(packs):
            batch = next(loader)
            for on in (True, False):
                b = batch if on else dataclasses.replace(batch, pack_meta=None)
                counts = step_host_syncs(model, b)
                rows.append(
                    dict(
                        variant=name,
                        pack=i,
                        images=0 if batch.grid_thw is None else batch.grid_thw.shape[0],
                        host_pack_metadata=on,
                        vit_layers=cfg.vision.num_layers,
                        llm_layers=cfg.llm.num_layers,
                        **counts,
                    )
                )
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "sites"}), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packs", type=int, default=3)
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--results", default=None)
    a = ap.parse_args()
    from megatron_navil.config import ParallelConfig
    from megatron_navil.utils import cpu_compat, distributed

    cpu_compat.activate()
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT="29561").items():
        os.environ.setdefault(k, v)
    distributed.initialize_model_parallel(ParallelConfig(), seed=1)
    try:
        rows = run(a.packs, a.seq_length)
    finally:
        distributed.destroy()
    if a.results:
        meta = dict(torch=torch.__version__, machine=platform.machine(), seq_length=a.seq_length)
        with open(a.results, "w") as f:
            json.dump({"env": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
