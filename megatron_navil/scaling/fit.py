"""`navil-scaling fit`: the three fits of the joint scaling study, from sweep rows.

(a) validation loss vs data, per (LLM, ViT) pair: L(D) = E + A D^-alpha with 4 or more points
    (E scanned, A and alpha by least squares in log space), a pure power law A D^-alpha with 2-3;
    the points are each budget's final validation loss (every budget is its own run with its
    own LR schedule), or one run's evaluations when the pair has a single budget.
(b) loss vs ViT size, per LLM size and budget: a parabola in log V through 3 or more sizes; its
    vertex is V_opt when it is a minimum inside the measured sizes. Otherwise the best measured
    size is reported as a bound (`edge`: lower / upper), never a number outside the grid.
(c) the joint law log V_opt = a + b log L (billions) through the LLM sizes with an interior
    optimum, per budget, with 95% confidence intervals from Student's t (n - 2 degrees of
    freedom; none with exactly two points). The law of the largest budget is the result.
Anything that cannot be fitted is a `problems` entry naming the fit and why (fewer than two
points, a diverged cell, an optimum at the grid's edge); the command prints them.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from megatron_navil.errors import UserError
from megatron_navil.scaling.stats import linear_fit, t_quantile

REQUIRED = (
    "cell",
    "llm",
    "vit",
    "status",
    "llm_params",
    "vit_params",
    "budget_samples",
    "samples_seen",
    "final_valid_loss",
    "evals",
)


class FitError(UserError):
    """Results that cannot be fitted at all; the message says what to do."""


def read_rows(path: str) -> list[dict]:
    """The sweep's JSONL rows; a later row of the same cell replaces an earlier one."""
    p = Path(path)
    if not p.exists():
        raise FitError(f"results file {path} does not exist; run `navil-scaling sweep` first")
    text = p.read_text()
    if not text.strip():
        raise FitError(f"results file {path} is empty: no cell has finished yet")
    rows: dict[str, dict] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise FitError(
                f"{path}:{i} is not a JSON row (cut off by an interrupted writer?); delete that "
                "line and re-run the sweep: its cell runs again"
            ) from None
        missing = [k for k in REQUIRED if not isinstance(row, dict) or k not in row]
        if missing:
            raise FitError(
                f"{path}:{i} lacks {', '.join(missing)}: not a row of navil-scaling sweep"
            )
        rows[row["cell"]] = row
    return list(rows.values())


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def usable_rows(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """(rows that finished with a finite loss, a problem line for each other row)."""
    ok, problems = [], []
    for r in rows:
        if r["status"] == "ok" and _finite(r["final_valid_loss"]):
            ok.append(r)
        elif r["status"] in ("ok", "diverged"):
            why = r.get("reason") or "non-finite validation loss"
            problems.append(f"cell {r['cell']} diverged ({why}): left out of every fit")
        else:
            why = r.get("reason") or r["status"]
            problems.append(f"cell {r['cell']} did not finish ({why}): left out of every fit")
    return ok, problems


def fit_data(samples, losses) -> dict:
    """(a) for one pair: E + A D^-alpha (>= 4 points) or A D^-alpha (2-3 points)."""
    d, loss = np.asarray(samples, float), np.asarray(losses, float)
    logd = np.log(d)
    best = None
    floors = [0.0]
    if len(d) >= 4:
        floors += list(np.linspace(0.0, loss.min() * 0.999, 200)[1:])
    for e in floors:
        fit = linear_fit(logd, np.log(loss - e))
        pred = e + np.exp(fit["a"] + fit["b"] * logd)
        sse = float(((pred - loss) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, e, fit)
    sse, e, fit = best
    sst = float(((loss - loss.mean()) ** 2).sum())
    return {
        "form": "E + A*D^-alpha" if len(d) >= 4 else "A*D^-alpha",
        "E": e,
        "A": math.exp(fit["a"]),
        "alpha": -fit["b"],
        "n": len(d),
        "r2": 1.0 - sse / sst if sst > 0 else 1.0,
        "samples_range": [float(d.min()), float(d.max())],
    }


def fit_vit(vit_params, losses) -> dict:
    """(b) for one LLM and budget: V_opt from a parabola in log V, or a bound at the edge."""
    v, loss = np.asarray(vit_params, float), np.asarray(losses, float)
    order = np.argsort(v)
    v, loss = v[order], loss[order]
    u = np.log(v)
    best = int(np.argmin(loss))
    out = {
        "vit_params": v.tolist(),
        "losses": loss.tolist(),
        "best_measured": float(v[best]),
        "n": len(v),
    }
    if len(v) >= 3:
        c2, c1, c0 = np.polyfit(u, loss, 2)
        out["parabola"] = [float(c0), float(c1), float(c2)]
        if c2 > 0:
            vertex = -c1 / (2 * c2)
            if u[0] <= vertex <= u[-1]:
                out.update(
                    v_opt=float(math.exp(vertex)),
                    loss_opt=float(c0 + c1 * vertex + c2 * vertex**2),
                    edge=None,
                )
                return out
    edge = "lower" if best == 0 else "upper" if best == len(v) - 1 else "interior-unfitted"
    out.update(v_opt=None, edge=edge)
    return out


def fit_law(llm_params, v_opt) -> dict:
    """(c) log V_opt = a + b log L in billions, with 95% intervals when n > 2."""
    lx = np.log(np.asarray(llm_params, float) / 1e9)
    ly = np.log(np.asarray(v_opt, float) / 1e9)
    fit = linear_fit(lx, ly)
    out = {
        "a": fit["a"],
        "b": fit["b"],
        "n": fit["n"],
        "r2": fit["r2"],
        "units": "log of billions of parameters",
        "llm_range_billion": [float(np.exp(lx.min())), float(np.exp(lx.max()))],
        "points": [[float(x), float(y)] for x, y in zip(llm_params, v_opt)],
        "a_ci95": None,
        "b_ci95": None,
    }
    if fit["n"] > 2:
        t = t_quantile(0.975, fit["n"] - 2)
        out["a_ci95"] = [fit["a"] - t * fit["se_a"], fit["a"] + t * fit["se_a"]]
        out["b_ci95"] = [fit["b"] - t * fit["se_b"], fit["b"] + t * fit["se_b"]]
    return out


def fit_all(rows: list[dict]) -> dict:
    """Every fit the rows allow, and a problem line for every one they do not."""
    ok, problems = usable_rows(rows)
    if not ok:
        raise FitError(
            "no usable cell: " + ("; ".join(problems) if problems else "the file has no rows")
        )
    data_fits, vit_fits, laws = [], [], []

    pairs = defaultdict(list)
    for r in ok:
        pairs[(r["llm"], r["vit"])].append(r)
    for (llm, vit), cells in sorted(pairs.items()):
        if len(cells) >= 2:
            pts = [(r["samples_seen"], r["final_valid_loss"]) for r in cells]
            source = "final loss of each budget"
        else:
            pts = [(e["samples"], e["valid_loss"]) for e in cells[0]["evals"]]
            pts = [(s, v) for s, v in pts if _finite(v) and s > 0]
            source = "evaluations of the one run"
        if len(pts) < 2:
            problems.append(f"(a) {llm} x {vit}: {len(pts)} point(s); a fit needs two")
            continue
        fit = fit_data(*zip(*sorted(pts)))
        fit.update(llm=llm, vit=vit, points=sorted(pts), source=source)
        data_fits.append(fit)

    groups = defaultdict(list)
    for r in ok:
        groups[(r["llm"], r["budget_samples"])].append(r)
    for (llm, budget), cells in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        where = f"(b) {llm} at {budget:g} samples"
        if len(cells) < 2:
            problems.append(
                f"{where}: {len(cells)} ViT size(s); a fit needs two (three to place an optimum)"
            )
            continue
        fit = fit_vit([r["vit_params"] for r in cells], [r["final_valid_loss"] for r in cells])
        fit.update(llm=llm, llm_params=cells[0]["llm_params"], budget_samples=budget)
        vit_fits.append(fit)
        if fit["v_opt"] is None:
            if fit["n"] < 3:
                why = "two ViT sizes bracket no optimum (three needed)"
            elif fit["edge"] in ("lower", "upper"):
                side = "smallest" if fit["edge"] == "lower" else "largest"
                why = (
                    f"the loss is lowest at the {side} ViT size ({fit['best_measured']:.4g} "
                    "parameters): V_opt lies outside the grid and is not extrapolated"
                )
            else:
                why = "the losses do not curve upward around their minimum (noise?)"
            problems.append(f"{where}: {why}; left out of the joint law")

    budgets = sorted({f["budget_samples"] for f in vit_fits})
    if not budgets:
        problems.append("(c) joint law: no LLM size has a ViT-size fit; the law needs two")
    for budget in budgets:
        pts = [
            (f["llm_params"], f["v_opt"])
            for f in vit_fits
            if f["budget_samples"] == budget and f["v_opt"] is not None
        ]
        if len({p[0] for p in pts}) < 2:
            problems.append(
                f"(c) joint law at {budget:g} samples: {len(pts)} LLM size(s) with an "
                "interior ViT optimum; the law needs two"
            )
            continue
        law = fit_law(*zip(*pts))
        law["budget_samples"] = budget
        if law["n"] == 2:
            problems.append(
                f"(c) joint law at {budget:g} samples: two points fix the line exactly; no "
                "confidence interval (three LLM sizes give one)"
            )
        laws.append(law)
    return {
        "data_fits": data_fits,
        "vit_fits": vit_fits,
        "laws": laws,
        "law": laws[-1] if laws else None,
        "problems": problems,
        "cells_used": len(ok),
        "cells_total": len(rows),
    }
