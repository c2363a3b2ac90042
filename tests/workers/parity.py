"""Worker: one training step's loss and gradients at a given parallel layout.

`--mode reference` (1 process): builds the model, saves its weights as a dist checkpoint, runs
the step, saves the gradients as a second dist checkpoint (gradients written into the weight
slots) and the per-micro-batch losses.
`--pack-meta` gives the batches the loader's host-side metadata (the reference is run without:
the comparison then also covers the switch).
`--mode parallel` (N processes): loads the reference weights at the requested TP/PP/EP layout
(Megatron's dist_checkpointing reshards), runs the same step through the pipeline schedule and
Megatron DDP, loads the reference gradients resharded the same way, and writes per-rank
comparisons (max abs / relative gradient difference per parameter, losses).
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["reference", "parallel"], required=True)
    p.add_argument("--flavor", default="debug-internlm2")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--recompute", default=None)
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seq-length", type=int, default=96)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--override", action="append", default=[])
    p.add_argument(
        "--pack-meta",
        action="store_true",
        help="attach the loader's host-side pack metadata (data.host_pack_metadata) to the batches",
    )
    p.add_argument(
        "--head-chunk",
        type=int,
        default=None,
        help="precision.lm_head_loss_chunk_rows (0: the plain LM head + cross entropy)",
    )
    return p.parse_args()


def test_batches(cfg, seq_length: int, n: int):
    from megatron_navil.data.synthetic import synthetic_batch

    g = torch.Generator().manual_seed(1234)
    layouts = [
        [[3, [(2, 4), (4, 6)], 5], [7], [2, [(2, 2)], 2, [(4, 2)], 3]],
        [[4, [(6, 4)], 6], [2, [(2, 6)], 9]],
        [[11], [5, 4]],  # text-only pack
    ]
    return [synthetic_batch(cfg, seq_length, g, layouts[i % len(layouts)]) for i in range(n)]


def main():
    a = _args()
    from megatron_navil.utils import cpu_compat

    cpu_compat.activate()  # this worker is a job's entry point; destroy() below turns it off
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_navil.checkpoint import model_sharded_state_dict
    from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
    from megatron_navil.models.navil import build_model
    from megatron_navil.training.step import forward_backward, wrap_ddp
    from megatron_navil.utils.distributed import destroy, initialize_model_parallel
    from megatron_navil.utils.host_syncs import HostSyncCounter

    cfg = get_flavor(a.flavor)
    if a.override:
        cfg = cfg.apply_overrides(dict(kv.split("=", 1) for kv in a.override))
    par = ParallelConfig(
        tensor_model_parallel_size=a.tp,
        pipeline_model_parallel_size=a.pp,
        expert_model_parallel_size=a.ep,
        sequence_parallel=a.sp,
        recompute_granularity=a.recompute,
        virtual_pipeline_model_parallel_size=a.vpp,
    )
    initialize_model_parallel(par, seed=7)
    precision = PrecisionConfig()
    if a.head_chunk is not None:
        precision = PrecisionConfig(lm_head_loss_chunk_rows=a.head_chunk)
    chunks = build_model(cfg, par, precision)
    model = chunks[0]
    weights_dir, grads_dir = os.path.join(a.dir, "weights"), os.path.join(a.dir, "grads")

    def load_into(directory):
        # Sharded keys are global, so a checkpoint saved as one chunk loads into virtual
        # pipeline chunks (model0, model1, ...) and vice versa.
        loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), directory)
        for key, chunk in zip(sorted(loaded), chunks):
            chunk.load_state_dict(loaded[key], strict=False)

    if a.mode == "reference":
        os.makedirs(weights_dir, exist_ok=True)
        dist_checkpointing.save(model_sharded_state_dict(chunks), weights_dir)
    else:
        load_into(weights_dir)

    ddp = wrap_ddp(chunks)
    # Data parallel ranks split the step's micro-batches; the per-token loss normalisation over
    # DP must make the gradients equal to the single-process step over all of them.
    dp, dp_rank = (
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
    )
    if a.micro_batches % dp:
        raise SystemExit(
            f"--micro-batches {a.micro_batches} must be divisible by DP={dp}: every "
            "rank of an expert-parallel group runs the same number of micro-batches"
        )
    batches = test_batches(cfg, a.seq_length, a.micro_batches)[dp_rank::dp]
    if a.pack_meta:  # as the loader does; the reference run computes the same in the model
        from megatron_navil.pack_meta import PackMeta

        for b in batches:
            b.pack_meta = PackMeta.build(cfg, b)
    with HostSyncCounter() as counter:
        reports = forward_backward(ddp, batches, a.seq_length)
    losses = [(r["lm loss"][0] / r["lm loss"][1]).item() for r in reports]
    grads = {
        (i, n): p.main_grad.detach().clone()
        for i, d in enumerate(ddp)
        for n, p in d.module.named_parameters()
    }

    rank = torch.distributed.get_rank()
    result = {
        "losses": losses,
        "rank": rank,
        "dp_rank": dp_rank,
        "sequence_parallel": model.config.sequence_parallel,
        "pp_last": parallel_state.is_pipeline_last_stage(),
        "grad_diff": {},
        # calls that would block the host on a GPU, by file:line (utils/host_syncs.py)
        "host_syncs": counter.by_site(),
    }
    if a.mode == "reference":
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(grads[(0, n)])
        os.makedirs(grads_dir, exist_ok=True)
        dist_checkpointing.save(model_sharded_state_dict(chunks), grads_dir)
    else:
        load_into(grads_dir)
        for i, chunk in enumerate(chunks):
            for n, p in chunk.named_parameters():
                ref, got = p.detach(), grads[(i, n)]
                scale = ref.abs().max().item()
                result["grad_diff"][f"chunk{i}.{n}"] = [(got - ref).abs().max().item(), scale]
    with open(f"{a.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    destroy()


if __name__ == "__main__":
    main()
