"""PNG plots of the fits (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_navil.config.flavors import SCALING_LAW_POINTS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_data(fits: list[dict], path: Path) -> None:
    """(a) validation loss vs samples seen, one curve per (LLM, ViT) pair."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, f in enumerate(fits):
        color = f"C{i % 10}"
        d, loss = zip(*f["points"])
        ax.scatter(d, loss, color=color, s=18)
        grid = np.geomspace(min(d), max(d), 50)  # the fitted range only: no extrapolation
        ax.plot(
            grid,
            f["E"] + f["A"] * grid ** (-f["alpha"]),
            color=color,
            label=f"{f['llm']} x {f['vit']} (alpha {f['alpha']:.2f})",
        )
    ax.set_xscale("log")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("validation loss")
    ax.set_title("(a) loss vs data per (LLM, ViT)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vit(fits: list[dict], path: Path) -> None:
    """(b) validation loss vs ViT size, one panel per LLM (its own loss scale: the encoder's
    effect is small next to the LLM's), one series per budget, parabola and V_opt."""
    plt = _plt()
    llms = sorted(
        {f["llm"] for f in fits}, key=lambda n: min(g["llm_params"] for g in fits if g["llm"] == n)
    )
    fig, axes = plt.subplots(1, len(llms), figsize=(4.2 * len(llms), 4), squeeze=False)
    budgets = sorted({f["budget_samples"] for f in fits})
    for ax, llm in zip(axes[0], llms):
        for f in (f for f in fits if f["llm"] == llm):
            color = f"C{budgets.index(f['budget_samples']) % 10}"
            ax.plot(
                f["vit_params"],
                f["losses"],
                "o",
                color=color,
                label=f"{f['budget_samples']:g} samples",
            )
            if "parabola" in f:
                c0, c1, c2 = f["parabola"]
                u = np.linspace(np.log(min(f["vit_params"])), np.log(max(f["vit_params"])), 50)
                ax.plot(np.exp(u), c0 + c1 * u + c2 * u**2, color=color, lw=1)
            if f["v_opt"] is not None:
                ax.plot([f["v_opt"]], [f["loss_opt"]], "*", color=color, ms=12)
        ax.set_xscale("log")
        ax.set_xlabel("ViT parameters")
        ax.set_title(f"LLM {llm}")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final validation loss")
    fig.suptitle("(b) loss vs ViT size (star: interior optimum; none: optimum outside the grid)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_law(laws: list[dict], path: Path) -> None:
    """(c) V_opt vs LLM size with the fitted law, its 95% band and the paper's points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, law in enumerate(laws):
        color = f"C{i % 10}"
        pts = np.asarray(law["points"], float) / 1e9
        ax.plot(pts[:, 0], pts[:, 1], "o", color=color)
        lo, hi = law["llm_range_billion"]
        x = np.geomspace(lo, hi, 50)  # the fitted range only
        ax.plot(
            x,
            np.exp(law["a"] + law["b"] * np.log(x)),
            color=color,
            label=f"{law['budget_samples']:g} samples: b = {law['b']:.2f}",
        )
        if law["b_ci95"] is not None:
            # the slope's interval, pivoting about the data's mean log size
            m = np.log(pts[:, 0]).mean()
            band = [np.exp(law["a"] + law["b"] * m + b * (np.log(x) - m)) for b in law["b_ci95"]]
            ax.fill_between(x, np.minimum(*band), np.maximum(*band), color=color, alpha=0.15)
    paper = np.asarray(SCALING_LAW_POINTS)
    ax.plot(paper[:, 0], paper[:, 1], "k^", label="paper read-off points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("LLM parameters (billions)")
    ax.set_ylabel("optimal ViT parameters (billions)")
    ax.set_title("(c) joint law log V_opt = a + b log L")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    """The PNGs of whatever was fitted; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, name, fn in (
        ("data_fits", "fit_loss_vs_data.png", plot_data),
        ("vit_fits", "fit_loss_vs_vit.png", plot_vit),
        ("laws", "fit_joint_law.png", plot_law),
    ):
        if result[key]:
            fn(result[key], out_dir / name)
            written.append(out_dir / name)
    return written
