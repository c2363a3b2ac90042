"""benchmarks/bench_step.py (issue 11's step benchmark) works end to end on CPU, as `--dry-run`.

Proves, before the one GPU run it gets, that every part of the script runs and reports:
- the dry run (a child process, debug flavors standing in for navil-2b/9b, fp32, local backend)
  exits 0, writes bench_step_results.json with every part, and each part produced numbers or
  an honest skip reason (FP8 recipes: "needs a GPU"; host syncs: "not available" in a
  checkout without utils/host_syncs.py; switches whose config field is absent: "not in this
  checkout", gradient-accumulation fusion: needs Transformer Engine);
- its ratios, TFLOP/s and MFU are computed from the measured times and the flops.py counts
  (recomputed here from the recorded values, never constants);
- the full-step fallback to a reduced depth and its full-depth extrapolation run (the dry run
  makes one step run at reduced depth on purpose);
- the markdown table is printed last;
and, in process: the realistic packs have the intended composition at the navil-2b shape
(several samples, images of 32..64 patches a side, about 30% / 60% visual tokens), and the
switch table skips fields this checkout lacks but runs those it has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

PARTS = ("layers", "vit", "fp8", "step", "host_syncs", "profile", "switches")


def _close(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_step")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_step.py", "--dry-run", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "bench_step_results.json").read_text())


@pytest.mark.processes
def test_every_part_reports_numbers_or_a_reason(dry_run):
    _, results = dry_run
    assert results["dry_run"] is True and results["device"]["device"] == "cpu"
    assert set(results["parts"]) == set(PARTS)
    for name, part in results["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part)
        if part["status"] == "skipped":
            assert part["reason"], name


@pytest.mark.processes
def test_layer_ratios_come_from_the_measured_times(dry_run):
    _, results = dry_run
    rows = results["parts"]["layers"]["rows"]
    assert {(r["flavor"], r["visual_target"]) for r in rows} == {
        (f, s) for f in ("navil-2b", "navil-9b") for s in (0.3, 0.6)
    }
    for r in rows:
        assert r["navil_ms"] > 0 and r["dense_ms"] > 0
        assert _close(r["ratio"], r["dense_ms"] / r["navil_ms"])
        # TFLOP/s of both from the same flops.py count of the pack: their ratio is the speed ratio
        assert _close(r["navil_tflops"] / r["dense_tflops"], r["ratio"])
        assert r["samples"] >= 3 and r["images"] >= 2 and r["real_tokens"] < r["tokens"]
        assert abs(r["visual_share"] - r["visual_target"]) < 0.15


@pytest.mark.processes
def test_fp8_recipes_recorded_and_vit_measured(dry_run):
    from megatron_navil.config.parallel import FP8_ROW_MULTIPLE

    _, results = dry_run
    fp8 = results["parts"]["fp8"]
    assert fp8["rows"]["bf16"]["status"] == "ok" and fp8["rows"]["bf16"]["ms"] > 0
    assert set(fp8["rows"]) == {"bf16", *FP8_ROW_MULTIPLE}  # every recipe of precision.fp8
    for recipe in FP8_ROW_MULTIPLE:
        assert fp8["rows"][recipe] == {"status": "skipped", "reason": "needs a GPU (dry run)"}
    for r in results["parts"]["vit"]["rows"]:
        assert r["ms"] > 0 and r["tflops"] > 0 and r["images"] >= 2
        assert _close(r["ms_per_layer"] * r["layers_timed"], r["ms"])


@pytest.mark.processes
def test_full_step_mfu_and_the_reduced_depth_fallback(dry_run):
    _, results = dry_run
    step = results["parts"]["step"]
    runs = {r["run"]: r for r in step["rows"]}
    assert set(runs) == {"stage1", "full", "full+recompute"}
    for r in runs.values():
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["tflop_per_step"] > 0
        assert _close(r["tflops"], r["tflop_per_step"] / (r["ms"] * 1e-3))
        assert _close(r["mfu"], r["tflops"] / r["peak_tflops"])
        assert all(isinstance(x, float) for x in r["losses"])
        assert len(r["packs"]) == r["micro_batches"] == 2
        for pack in r["packs"]:  # padding trim (on by default) cuts the dry run's packs too
            assert pack["real_tokens"] <= pack["tokens_run"] < pack["tokens"], pack
    # stage 1 freezes the text weights: fewer model FLOPs than full training on the same packs
    assert runs["stage1"]["tflop_per_step"] < runs["full"]["tflop_per_step"]
    assert runs["full"]["full_depth"] and runs["full"]["depth"] == step["full_depth"]
    reduced = runs["full+recompute"]
    assert not reduced["full_depth"] and reduced["depth"] != step["full_depth"]
    assert reduced["ms_full_depth_estimate"] > reduced["ms"]


@pytest.mark.processes
def test_profile_switches_syncs_and_the_table(dry_run):
    from bench_step_train import SWITCHES

    proc, results = dry_run
    prof = results["parts"]["profile"]
    shares = [e["share"] for e in prof["top"]]
    assert len(prof["top"]) == 15 and shares == sorted(shares, reverse=True)
    assert 0 < sum(shares) <= 1.0 + 1e-9
    rows = results["parts"]["switches"]["rows"]
    assert [r["label"] for r in rows] == [s[0] for s in SWITCHES]
    assert any(r["status"] == "ok" for r in rows)  # overlap_param_gather exists on main
    for r in rows:
        if r["status"] == "ok":
            assert _close(r["speedup"], r["off_ms"] / r["on_ms"])
        else:
            assert r["status"] == "skipped" and r["reason"], r
    syncs = results["parts"]["host_syncs"]
    if syncs["status"] == "ok":  # utils/host_syncs.py present (issue11-hostsync merged)
        assert syncs["run"] == "stage1"  # counted on the step part's first trained model
        # the same pack without the loader's metadata: the counter sees the model's reads
        assert syncs["syncs_without_pack_meta"] > syncs["syncs_per_micro_batch"] >= 0
    else:
        assert "not available" in syncs["reason"]
    lines = proc.stdout.rstrip("\n").splitlines()
    start = max(i for i, ln in enumerate(lines) if ln.startswith("## bench_step"))
    table = lines[start + 2 :]
    assert table[0].startswith("| part |") and table[1].startswith("|---|")
    assert all(ln.startswith("| ") and ln.count("|") == 7 for ln in table[2:]), table
    assert sum(ln.startswith("| profile |") for ln in table) == 15


# ----------------------------------------------------------------------------- in process
def test_realistic_packs_at_the_2b_shape():
    import torch
    from bench_step_common import make_pack, pack_facts

    from megatron_navil.config.flavors import get_flavor

    cfg = get_flavor("navil-2b")
    for share in (0.3, 0.6):
        for seed in range(3):
            batch = make_pack(cfg, 8192, share, (32, 64), seed)
            facts = pack_facts(cfg, batch)
            assert abs(facts["visual_share"] - share) < 0.1, facts
            assert facts["samples"] >= 5 and facts["images"] >= 3
            assert 0.95 * 8192 <= facts["real_tokens"] < 8192  # a little padding, as packed
            grid = batch.grid_thw
            assert torch.all((grid[:, 1:] >= 32) & (grid[:, 1:] <= 64) & (grid[:, 1:] % 2 == 0))


def test_switch_plan_skips_fields_this_checkout_lacks():
    from bench_step_train import switch_plan

    table = (
        ("real", "training.seq_length", 1, 2, {}, False),
        ("absent", "training.no_such_switch", True, False, {}, False),
        ("needs absent", "training.seq_length", 1, 2, {"optimizer.no_such": True}, False),
        ("TE only", "training.seq_length", 1, 2, {}, True),
    )
    plan = {p["label"]: p for p in switch_plan(table)}
    assert plan["real"]["present"] and "reason" not in plan["real"]
    assert not plan["absent"]["present"]
    assert plan["absent"]["reason"] == "not in this checkout: training.no_such_switch"
    assert plan["needs absent"]["reason"] == "not in this checkout: optimizer.no_such"
    assert not plan["TE only"]["present"]  # no GPU here: the local backend refuses it
    assert "transformer_engine" in plan["TE only"]["reason"]
