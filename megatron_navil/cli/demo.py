"""navil-demo: build a NaViL flavor and run a few forward/backward steps on synthetic packs.

A smoke test of the whole model path on this machine (CPU or GPU, any single-process flavor):
vision encoder, connector, modality-expert LLM, packed sequences, loss, backward, an optimizer
step. Prints parameter counts, per-step loss and time. Multi-process runs go through
navil-pretrain.
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


def _main(argv) -> int:
    p = argparse.ArgumentParser(prog="navil-demo", description=__doc__.splitlines()[0])
    p.add_argument(
        "--flavor",
        default="debug-internlm2",
        help="model flavor (see megatron_navil.config.FLAVORS)",
    )
    p.add_argument(
        "--steps", type=int, default=5, help="optimizer steps on the same synthetic pack"
    )
    p.add_argument("--seq-length", type=int, default=256, help="tokens per packed micro-batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    args = p.parse_args(argv)

    import torch

    from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
    from megatron_navil.data.synthetic import synthetic_batch
    from megatron_navil.models.navil import NaViLModel
    from megatron_navil.training.step import counted_positions
    from megatron_navil.utils.distributed import initialize_model_parallel

    cfg = get_flavor(args.flavor)
    initialize_model_parallel(ParallelConfig(), seed=args.seed)
    precision = PrecisionConfig(params_dtype="bfloat16" if torch.cuda.is_available() else "float32")
    model = NaViLModel(cfg, ParallelConfig(), precision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    total, active = cfg.num_parameters()
    log.info(
        "%s: %.2fM parameters (%.2fM activated per token), backend %s on %s",
        args.flavor,
        total / 1e6,
        active / 1e6,
        model.backend.name,
        device,
    )
    batch = synthetic_batch(cfg, args.seq_length, torch.Generator().manual_seed(args.seed)).to(
        device
    )
    counted = counted_positions(batch, cfg.img_context_id).sum()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = model(**batch.model_inputs()).sum() / counted
        loss.backward()
        opt.step()
        losses.append(loss.item())
        log.info("step %d  loss %.4f  %.3f s", step, losses[-1], time.perf_counter() - t0)
    if args.steps > 1 and not losses[-1] < losses[0]:
        log.error("loss did not decrease (%.4f -> %.4f)", losses[0], losses[-1])
        return 1
    return 0


def main(argv=None) -> int:
    from megatron_navil.utils import cpu_compat
    from megatron_navil.utils.cli import run_cli
    from megatron_navil.utils.distributed import teardown_if_new

    cleanup = teardown_if_new()  # decided before this job creates anything
    cpu_compat.activate()  # on CPU, Megatron needs the layer; the teardown turns it off
    return run_cli(_main, argv, interrupted="interrupted", cleanup=cleanup)


if __name__ == "__main__":
    sys.exit(main())
