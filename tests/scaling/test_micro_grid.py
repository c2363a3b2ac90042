"""The sweep machinery end to end on CPU: a 3 LLM x 3 ViT micro-grid of the debug family
(mock data, one budget, a few steps) through `navil-scaling sweep --parallel 2`, then `fit`.

Proves: every cell becomes one `ok` row with its config, samples and tokens seen and the
validation losses at the same sample counts in every cell (the data order does not depend on
the model); a second run skips finished cells and re-runs a missing one only; a cell that
diverges (LR 1e12) is recorded as `diverged` with its step, and fitting only such a cell is
one error naming it; `fit` writes fit.json and the plots, and every V_opt it reports lies
inside the measured ViT sizes, otherwise it names the bound instead of inventing a number.
Whether this grid reproduces the paper's finding is not asserted (mock data carries no image
information): benchmarks/scaling_micro_grid.py runs a real study. About a minute on 2 cores.
On failure look at megatron_navil/scaling/sweep.py and the cell logs under the tmp dir.
"""

from __future__ import annotations

import json

import pytest

from megatron_navil.cli.scaling import main
from megatron_navil.scaling.sweep import RESULTS

pytestmark = [pytest.mark.processes, pytest.mark.slow]

GRID = {
    "flavor": "debug-internlm2",
    "llm": {
        "w32": {"hidden_size": 32, "ffn_hidden_size": 64, "kv_channels": 8},
        "w64": {},  # the flavor's own LLM
        "w128": {"hidden_size": 128, "ffn_hidden_size": 256, "kv_channels": 32},
    },
    "vit": {
        "v16": {"hidden_size": 16, "ffn_hidden_size": 64},
        "v32": {},
        "v64": {"hidden_size": 64, "ffn_hidden_size": 256},
    },
    "budgets_samples": [40],
    "seq_length": 256,
    "global_batch_size": 2,
    "num_evals": 2,
    "eval_iters": 1,
}


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_micro_grid_runs_resumes_and_fits(tmp_path, capsys):
    spec, out = tmp_path / "grid.json", tmp_path / "sweep"
    spec.write_text(json.dumps(GRID))
    assert main(["sweep", str(spec), "--out", str(out), "--parallel", "2"]) == 0
    rows = _rows(out / RESULTS)
    assert sorted(r["cell"] for r in rows) == sorted(
        f"{a}__{b}__40" for a in ("w32", "w64", "w128") for b in ("v16", "v32", "v64")
    )
    for r in rows:
        assert r["status"] == "ok", r
        assert r["samples_seen"] > 0 and r["tokens_seen"] == r["steps"] * 2 * 256
        assert len(r["evals"]) == 2 and r["final_valid_loss"] == r["evals"][-1]["valid_loss"]
        want = {"w32": 32, "w64": None, "w128": 128}[r["llm"]]  # w64: the flavor's width
        assert r["config"]["model"].get("llm.hidden_size") == want
    assert len({tuple(e["samples"] for e in r["evals"]) for r in rows}) == 1
    assert (
        rows[0]["llm_params"] != next(r for r in rows if r["llm"] != rows[0]["llm"])["llm_params"]
    )

    # resume: nothing to do, then only a cell whose row is gone runs again
    capsys.readouterr()
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert "0 cells ran now" in capsys.readouterr().out
    kept = [r for r in rows if r["cell"] != "w64__v32__40"]
    (out / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert "1 cells ran now" in capsys.readouterr().out
    assert len(_rows(out / RESULTS)) == 9

    assert main(["fit", str(out / RESULTS), "--out", str(tmp_path / "fit")]) == 0
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert len(fit["data_fits"]) == 9 and len(fit["vit_fits"]) == 3
    for f in fit["vit_fits"]:  # an optimum inside the grid, or a bound that says so
        if f["v_opt"] is not None:
            assert min(f["vit_params"]) <= f["v_opt"] <= max(f["vit_params"])
        else:
            assert any(f["llm"] in p and "joint law" in p for p in fit["problems"])
    assert (fit["law"] is None) == any(
        p.startswith("(c)") and "needs two" in p for p in fit["problems"]
    )
    assert (tmp_path / "fit" / "fit_loss_vs_data.png").exists()


def test_a_diverging_cell_is_recorded_and_named(tmp_path, capsys):
    grid = dict(
        GRID,
        llm={"w32": GRID["llm"]["w32"]},
        vit={"v16": GRID["vit"]["v16"]},
        lr=1e12,
        extra_args=["--clip-grad", "0"],
    )
    spec, out = tmp_path / "grid.json", tmp_path / "sweep"
    spec.write_text(json.dumps(grid))
    main(["sweep", str(spec), "--out", str(out)])
    (row,) = _rows(out / RESULTS)
    assert row["status"] == "diverged" and row["reason"].startswith("non-finite loss at step")
    capsys.readouterr()
    assert main(["fit", str(out / RESULTS), "--out", str(tmp_path / "fit")]) == 2
    err = capsys.readouterr().err
    assert "no usable cell: cell w32__v16__40 diverged" in err
