"""`navil-scaling fit` recovers known laws from synthetic rows, and says why when it cannot.

The independent reference is the generator: rows are made from a loss surface with a known
joint law log V_opt = a + b log L (and a known data law E + A D^-alpha), so every recovered
coefficient is compared with the number that made the data. Tolerances: exact data must come
back to 1e-6 (the fits are closed-form least squares); noisy data within the 95% interval the
fit itself reports. Bad input (empty or cut-off files, diverged cells, too few points, an
optimum at the grid's edge) must give a message naming the cell or the fit, never a number
outside the measured range. On failure look at megatron_navil/scaling/fit.py and stats.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megatron_navil.scaling.fit import FitError, fit_all, fit_data, read_rows
from megatron_navil.scaling.stats import t_cdf, t_quantile

A_TRUE, B_TRUE = math.log(0.35), 0.55  # V_opt = 0.35B at L = 1B, growing as L^0.55
LLMS = [0.3e9, 0.8e9, 2e9, 5e9, 12e9]
VITS = list(np.geomspace(0.03e9, 6e9, 9))
BUDGETS = [15e6, 60e6]


def _loss(llm: float, vit: float, budget: float, rng=None, noise: float = 0.0) -> float:
    v_opt = math.exp(A_TRUE + B_TRUE * math.log(llm / 1e9)) * 1e9
    loss = 1.5 + 2.0 * (llm / 1e9) ** -0.2 + 30.0 * budget**-0.25
    loss += 0.08 * (math.log(vit) - math.log(v_opt)) ** 2  # a parabola in log V
    return loss + (rng.normal(0, noise) if rng is not None else 0.0)


def _rows(llms=LLMS, vits=VITS, budgets=BUDGETS, noise=0.0, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i, llm in enumerate(llms):
        for j, vit in enumerate(vits):
            for budget in budgets:
                loss = _loss(llm, vit, budget, rng, noise)
                rows.append(
                    {
                        "cell": f"l{i}__v{j}__{budget:g}",
                        "llm": f"l{i}",
                        "vit": f"v{j}",
                        "status": "ok",
                        "reason": None,
                        "llm_params": llm,
                        "vit_params": vit,
                        "budget_samples": budget,
                        "samples_seen": budget,
                        "final_valid_loss": loss,
                        "evals": [
                            {"step": 1, "samples": budget / 2, "valid_loss": loss + 0.1},
                            {"step": 2, "samples": budget, "valid_loss": loss},
                        ],
                    }
                )
    return rows


def test_exact_rows_give_back_the_joint_law():
    result = fit_all(_rows())
    assert not [p for p in result["problems"] if p.startswith("(c)")], result["problems"]
    for law in result["laws"]:  # one law per budget; the optimum does not depend on it here
        assert law["a"] == pytest.approx(A_TRUE, abs=1e-6)
        assert law["b"] == pytest.approx(B_TRUE, abs=1e-6)
        assert law["n"] == len(LLMS)
    assert result["law"]["budget_samples"] == max(BUDGETS)
    for f in result["vit_fits"]:
        llm = f["llm_params"]
        assert f["v_opt"] == pytest.approx(
            math.exp(A_TRUE + B_TRUE * math.log(llm / 1e9)) * 1e9, rel=1e-6
        )


def test_the_reported_interval_covers_the_true_slope_about_95_percent_of_the_time():
    # Noise on every loss moves every V_opt; over 60 noisy grids the 95% interval must hold the
    # true slope in most of them (a miscomputed interval, e.g. a z instead of a t quantile with
    # 3 degrees of freedom or a wrong standard error, covers far less or far more).
    covered, widths = 0, []
    for seed in range(60):
        law = fit_all(_rows(budgets=[60e6], noise=0.003, seed=seed))["law"]
        lo, hi = law["b_ci95"]
        covered += lo < B_TRUE < hi
        widths.append(hi - lo)
    assert 0.85 <= covered / 60 <= 1.0, covered
    assert float(np.median(widths)) < 0.5


def test_t_quantiles_match_the_table():
    # Student's t, two-sided 95%: the textbook values.
    for dof, t in [(1, 12.706), (2, 4.303), (3, 3.182), (10, 2.228), (30, 2.042)]:
        assert t_quantile(0.975, dof) == pytest.approx(t, abs=2e-3)
    assert t_cdf(0.0, 5) == pytest.approx(0.5)


@pytest.mark.parametrize("n", [3, 6])
def test_data_law_is_recovered(n):
    d = np.geomspace(1e6, 1e8, n)
    e, a, alpha = (1.2, 40.0, 0.3) if n >= 4 else (0.0, 40.0, 0.3)
    fit = fit_data(d, e + a * d**-alpha)
    assert fit["alpha"] == pytest.approx(alpha, rel=0.02)
    assert fit["E"] == pytest.approx(e, abs=0.02)
    assert fit["form"] == ("E + A*D^-alpha" if n >= 4 else "A*D^-alpha")


def test_optimum_at_the_edge_is_a_bound_not_an_extrapolation():
    # ViT sizes all below every V_opt: the loss falls all the way to the largest size.
    rows = _rows(vits=list(np.geomspace(0.001e9, 0.01e9, 4)), budgets=[60e6])
    result = fit_all(rows)
    assert all(f["v_opt"] is None and f["edge"] == "upper" for f in result["vit_fits"])
    assert result["law"] is None
    assert any("largest ViT size" in p and "not extrapolated" in p for p in result["problems"])


def test_two_llm_sizes_fit_without_an_interval_and_say_so():
    result = fit_all(_rows(llms=LLMS[:2], budgets=[60e6]))
    assert result["law"]["b"] == pytest.approx(B_TRUE, abs=1e-6)
    assert result["law"]["b_ci95"] is None
    assert any("no confidence interval" in p for p in result["problems"])


def test_fewer_than_two_points_is_named():
    rows = _rows(llms=LLMS[:1], vits=VITS[:1], budgets=[60e6])
    rows[0]["evals"] = rows[0]["evals"][:1]
    result = fit_all(rows)
    assert any("(a) l0 x v0: 1 point(s); a fit needs two" in p for p in result["problems"])
    assert any("(b) l0" in p and "1 ViT size(s)" in p for p in result["problems"])
    assert any("(c)" in p and "the law needs two" in p for p in result["problems"])


def test_diverged_cell_is_left_out_with_its_reason():
    rows = _rows(budgets=[60e6])
    rows[0].update(status="diverged", reason="non-finite loss at step 7", final_valid_loss=None)
    rows[1]["final_valid_loss"] = float("nan")
    result = fit_all(rows)
    assert result["cells_used"] == len(rows) - 2
    assert any(rows[0]["cell"] in p and "step 7" in p for p in result["problems"])
    assert any(rows[1]["cell"] in p and "diverged" in p for p in result["problems"])
    with pytest.raises(FitError, match="no usable cell"):
        fit_all(rows[:1])


def test_empty_missing_and_cut_off_files_are_one_clear_error(tmp_path):
    with pytest.raises(FitError, match="does not exist"):
        read_rows(str(tmp_path / "none.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(FitError, match="is empty"):
        read_rows(str(empty))
    cut = tmp_path / "cut.jsonl"
    cut.write_text(json.dumps(_rows()[0]) + "\n" + json.dumps(_rows()[1])[:40] + "\n")
    with pytest.raises(FitError, match=r"cut.jsonl:2 is not a JSON row"):
        read_rows(str(cut))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"cell": "x", "status": "ok"}) + "\n")
    with pytest.raises(FitError, match="lacks llm, vit"):
        read_rows(str(other))


def test_a_later_row_of_a_cell_replaces_the_earlier(tmp_path):
    rows = _rows(budgets=[60e6])
    first = dict(rows[0], status="failed", reason="killed")
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [first] + rows))
    assert len(read_rows(str(path))) == len(rows)
    assert fit_all(read_rows(str(path)))["cells_used"] == len(rows)
