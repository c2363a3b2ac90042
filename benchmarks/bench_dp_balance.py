"""DP vision-FLOP balance: the slowest rank's step FLOPs over the mean, round-robin vs balanced
dealing, side by side on the same plan (CPU only; no images needed).

    PYTHONPATH=. python benchmarks/bench_dp_balance.py

Corpus: data/synthetic.py's web-like mix (captions, conversations, interleaved documents with
log-normal image areas around 0.35 MP, text-only samples added to reach the visual-token share)
sized with the real NaViL resize rules of the model flavor; packs planned by the real planner
(seq_length 8192, 32 images per pack); pack cost = training/pack_cost.py (model FLOPs, vision
encoder included). For each (dp_size, micro-batches per rank per step, balance_window_steps)
the epoch's steps are dealt both ways and the table reports, over the epoch: sum of the slowest
rank's FLOPs / sum of the mean rank's - 1 (time lost waiting, if time follows FLOPs), the worst
single step, and the dealing cost per step (the loader thread computes it once per step on every
rank).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from megatron_navil.config.flavors import get_flavor
from megatron_navil.data.dealing import epoch_step_loads, imbalance
from megatron_navil.data.order import EpochOrder
from megatron_navil.data.planner import EpochPlan, PlanParams
from megatron_navil.data.synthetic import synthetic_corpus_costs
from megatron_navil.training.pack_cost import planned_pack_flops
from megatron_navil.utils.logging import get_logger

log = get_logger("bench_dp_balance")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (dp_size, micro-batches per rank per step, balance_window_steps)
LAYOUTS = (
    (8, 32, 1),
    (8, 8, 1),
    (8, 4, 1),
    (8, 2, 1),
    (8, 2, 16),
    (8, 1, 1),
    (8, 1, 16),
    (8, 1, 64),
    (64, 16, 1),
    (64, 8, 1),
    (64, 4, 1),
    (64, 1, 64),
    (256, 4, 1),
)


def measure(flavor: str, share: float, image_samples: int, seq: int, layouts, seed: int):
    cfg = get_flavor(flavor)
    costs = synthetic_corpus_costs(cfg, image_samples, share, seed=seed)
    params = PlanParams(seq, 32, 32, 4096, "truncate")
    cost = planned_pack_flops(cfg, seq)
    n = len(costs.length)
    rows = []
    for dp, mb, window in layouts:
        row = {
            "flavor": flavor,
            "visual_share": share,
            "dp_size": dp,
            "micro_batches": mb,
            "window_steps": window,
        }
        for balanced in (False, True):
            order = EpochOrder([n], [1.0], None, seed, 0, True, params.chunk, 64)
            plan = EpochPlan(order, costs, params, 0, dp * mb)
            t = time.perf_counter()
            steps = epoch_step_loads(plan, dp, mb, cost, balanced, None, window)
            dt = time.perf_counter() - t
            lost, worst = imbalance(steps)
            name = "balanced" if balanced else "round_robin"
            row[name] = {
                "over_mean": lost,
                "worst_step": worst,
                "ms_per_step": 1e3 * dt / len(steps),
            }
            row["steps"] = len(steps)
        rows.append(row)
        log.info(
            "%s %.0f%% visual, %d ranks x %d, window %d: round-robin %.1f%% (worst %.1f%%), "
            "balanced %.2f%% (worst %.2f%%), %d steps",
            flavor,
            100 * share,
            dp,
            mb,
            window,
            100 * row["round_robin"]["over_mean"],
            100 * row["round_robin"]["worst_step"],
            100 * row["balanced"]["over_mean"],
            100 * row["balanced"]["worst_step"],
            row["steps"],
        )
    return rows


def table(rows) -> str:
    out = [
        "| flavor | visual tokens | ranks x micro-batches | window steps | steps | round-robin: "
        "over mean (worst step) | balanced: over mean (worst step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rr, b = r["round_robin"], r["balanced"]
        out.append(
            f"| {r['flavor']} | {100 * r['visual_share']:.0f}% | {r['dp_size']} x "
            f"{r['micro_batches']} | {r['window_steps']} | {r['steps']} | "
            f"{100 * rr['over_mean']:.1f}% "
            f"({100 * rr['worst_step']:.1f}%) | {100 * b['over_mean']:.2f}% "
            f"({100 * b['worst_step']:.2f}%) |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavor", default="navil-2b", help="model flavor (shape, resize rules)")
    p.add_argument("--image-samples", type=int, default=60000, help="image-bearing samples")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--results",
        default=os.path.join(REPO, "benchmarks", "bench_dp_balance_results.json"),
        help="where to write the results JSON",
    )
    a = p.parse_args()
    rows = []
    for share in (0.3, 0.6):
        rows += measure(a.flavor, share, a.image_samples, a.seq_length, LAYOUTS, a.seed)
    md = table(rows)
    log.info("\n%s", md)
    with open(a.results, "w") as f:
        json.dump(
            {
                "rows": rows,
                "table": md,
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "command": "PYTHONPATH=. python benchmarks/bench_dp_balance.py",
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
