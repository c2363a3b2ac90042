"""navil-scaling: plan a cluster run, run a scaling sweep, fit the joint vision/LLM law.

    navil-scaling plan --model navil-9b --gpus 64 --seq-length 8192 --global-batch-size 512
    navil-scaling plan --llm-size 14 --gpus 128 --gpu-memory-gb 141 --json plan.json
    navil-scaling sweep grid.yaml --out sweep/ --parallel 2          # local, 2 cells at a time
    navil-scaling sweep grid.yaml --out sweep/ --slurm --max-parallel 16   # writes sweep.sbatch
    navil-scaling fit sweep/results.jsonl --out fit/                 # fit.json + PNG plots
See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_navil.config.flags import add_flags, flag_values
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


def _out(text: str) -> None:
    """The command's result (the plan table, JSON, sweep commands and summaries) on stdout, for
    reading and piping; status lines go to the logger (stderr)."""
    sys.stdout.write(text + "\n")


DEFAULT_THROUGHPUT = Path("benchmarks/layer_throughput.json")
"""A measured table the planner uses when present: here, or in the checkout this package runs
from (an editable install)."""


def _default_throughput() -> str | None:
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / DEFAULT_THROUGHPUT).exists():
            return str(base / DEFAULT_THROUGHPUT)
    return None


def _parser() -> tuple[argparse.ArgumentParser, list]:
    from megatron_navil.scaling.spec import PlanSettings

    p = argparse.ArgumentParser(prog="navil-scaling", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="TP/PP/EP/DP layouts that fit, ranked by step time")
    what = plan.add_argument_group("the model (one of)")
    what.add_argument("--model", metavar="FLAVOR", help="a flavor (navil-2b, navil-9b, ...)")
    what.add_argument(
        "--llm-size",
        type=float,
        metavar="BILLIONS",
        help="an LLM of about this size; the vision encoder from the joint law",
    )
    what.add_argument(
        "--family",
        choices=["qwen3", "internlm2"],
        default="qwen3",
        help="LLM family of --llm-size (vocabulary, norms, FFN ratio)",
    )
    what.add_argument(
        "--vision-from-law",
        action="store_true",
        help="replace the flavor's vision encoder by the joint law's",
    )
    what.add_argument(
        "--law",
        metavar="FIT_JSON",
        help="a law fitted by `navil-scaling fit` instead of the paper's points",
    )
    fields = add_flags(plan, PlanSettings)
    plan.add_argument(
        "--throughput",
        metavar="JSON",
        help=f"measured per-layer throughput (default: {DEFAULT_THROUGHPUT} when "
        "present, else the documented defaults)",
    )
    plan.add_argument("--json", metavar="FILE", help="write the whole plan as JSON ('-': stdout)")
    plan.add_argument("--top", type=int, default=10, help="rows of the table")
    plan.add_argument("--show-refused", action="store_true", help="list refused layouts")

    sweep = sub.add_parser("sweep", help="run an LLM x ViT x data grid through navil-pretrain")
    sweep.add_argument("spec", help="the grid (YAML or JSON, see docs/scaling.md)")
    sweep.add_argument("--out", required=True, help="sweep directory (results.jsonl, cells/)")
    sweep.add_argument("--parallel", type=int, default=1, help="cells at a time (local)")
    sweep.add_argument(
        "--cell",
        type=int,
        nargs="+",
        metavar="I",
        help="run only these grid cells (a SLURM array task passes its id)",
    )
    sweep.add_argument("--slurm", action="store_true", help="write <out>/sweep.sbatch instead")
    sweep.add_argument("--max-parallel", type=int, default=8, help="array tasks at a time")
    sweep.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra #SBATCH line, e.g. --sbatch-arg=--partition=gpu",
    )
    sweep.add_argument("--dry-run", action="store_true", help="print each cell's command")

    fit = sub.add_parser("fit", help="fit loss vs data, loss vs ViT size and the joint law")
    fit.add_argument("results", help="a sweep's results.jsonl")
    fit.add_argument("--out", required=True, help="directory for fit.json and the PNG plots")
    fit.add_argument("--no-plots", action="store_true", help="write fit.json only")
    return p, fields


def _plan(args, fields) -> int:
    from megatron_navil.scaling.law import load_law
    from megatron_navil.scaling.planner import plan
    from megatron_navil.scaling.report import plan_table
    from megatron_navil.scaling.shapes import planned_model
    from megatron_navil.scaling.spec import PlanSettings
    from megatron_navil.scaling.throughput import ThroughputTable

    settings = PlanSettings().apply_overrides(flag_values(args, fields), parse=False)
    law = load_law(args.law) if args.law else None
    section, notes = planned_model(
        args.model, args.llm_size, args.family, args.vision_from_law, law
    )
    path = args.throughput or _default_throughput()
    result = plan(section, settings.cluster, settings.workload, ThroughputTable.load(path), notes)
    if args.json == "-":
        _out(json.dumps(result.to_dict(), indent=1))
        return 0
    _out(plan_table(result, args.top, args.show_refused))
    if args.json:
        from megatron_navil.utils.files import write_json_atomic

        write_json_atomic(args.json, result.to_dict(), indent=1)
        log.info("wrote %s", args.json)
    return 0 if result.ranked else 2


def _sweep(args) -> int:
    from megatron_navil.scaling import sweep as sw
    from megatron_navil.scaling.sweep_spec import SweepSpec

    spec = SweepSpec.load(args.spec)
    out = Path(args.out)
    if args.slurm:
        path = sw.write_sbatch(args.spec, spec, out, args.max_parallel, args.sbatch_arg)
        log.info(
            "wrote %s: submit it with `sbatch %s` (re-submit to finish a partial grid)", path, path
        )
        return 0
    if args.dry_run:
        for cell in sw.cells_of(spec):
            cmd = sw.command(spec, cell, out / "cells" / cell.id)
            _out(f"[{cell.index}] {cell.id}: {' '.join(cmd)}")
        return 0
    rows = sw.run_local(spec, out, max(1, args.parallel), args.cell)
    bad = [r for r in rows if r["status"] != "ok"]
    _out(f"{len(rows)} cells ran now ({len(bad)} not ok); rows in {out / sw.RESULTS}")
    for r in bad:
        _out(f"  {r['cell']}: {r['status']}: {r['reason']}")
    return 0 if not any(r["status"] == "failed" for r in rows) else 1


def _fit(args) -> int:
    from megatron_navil.scaling.fit import fit_all, read_rows
    from megatron_navil.scaling.report import fit_summary
    from megatron_navil.utils.files import write_json_atomic

    result = fit_all(read_rows(args.results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["results_file"] = str(args.results)
    write_json_atomic(out / "fit.json", result, indent=1)
    _out(fit_summary(result))
    log.info("wrote %s", out / "fit.json")
    if not args.no_plots:
        from megatron_navil.scaling.plots import write_plots

        for path in write_plots(result, out):
            log.info("wrote %s", path)
    return 0


def _main(argv) -> int:
    parser, fields = _parser()
    args = parser.parse_args(argv)
    if args.command == "plan":
        return _plan(args, fields)
    if args.command == "sweep":
        return _sweep(args)
    return _fit(args)


def main(argv=None) -> int:
    from megatron_navil.utils.cli import run_cli

    return run_cli(_main, argv, interrupted="interrupted; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
