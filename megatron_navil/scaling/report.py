"""The plan and the fit as text tables (the CLI prints them; JSON carries everything)."""

from __future__ import annotations

from megatron_navil.scaling.planner import Plan, pretrain_args
from megatron_navil.scaling.spec import GIB


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def plan_table(p: Plan, top: int = 10, show_refused: bool = False) -> str:
    d = p.to_dict()["model"]
    c, w = p.cluster, p.workload
    lines = [
        f"model: {p.section.flavor} {p.section.explicit or ''}".rstrip(),
        f"  LLM {d['llm_billion']:.2f}B, ViT {d['vision_billion']:.2f}B, total "
        f"{d['total_billion']:.2f}B ({d['activated_billion']:.2f}B activated)",
        f"cluster: {c.num_gpus} GPUs x {c.gpu_memory_gb:g} GB ({c.gpus_per_node} per node, "
        f"{c.reserved_gb:g} GB reserved), links {c.intra_node_gbps:g}/{c.inter_node_gbps:g} GB/s",
        f"workload: seq {w.seq_length}, global batch {w.global_batch_size}, stage {w.stage}, "
        f"{w.visual_fraction:.0%} visual tokens, images of {w.patches_per_image} patches, "
        f"{w.dtype}, {w.backend}",
        f"throughput table: {p.throughput_source}",
        *p.notes,
        "",
    ]
    head = [
        "rank",
        "layout",
        "mbs",
        "recomp",
        "peak GiB",
        "param",
        "grad",
        "optim",
        "act/mb",
        "act(no rc)",
        "act(full rc)",
        "ViT share",
        "step s",
        "tok/s",
        "MFU",
    ]
    rows = []
    for i, ch in enumerate(p.ranked[:top], 1):
        s = max(ch.stages, key=lambda x: x.total)
        t = ch.time
        vit = (s.vision_static + s.in_flight * s.vision_activations) / GIB
        rows.append(
            [
                str(i),
                ch.layout.label,
                str(ch.micro_batch_size),
                "full" if ch.recompute else "-",
                f"{s.total / GIB:.1f}",
                f"{s.parameters / GIB:.1f}",
                f"{s.gradients / GIB:.1f}",
                f"{s.optimizer / GIB:.1f}",
                f"{s.activations_per_micro_batch / GIB:.1f}",
                f"{s.activations_no_recompute / GIB:.1f}",
                f"{s.activations_full_recompute / GIB:.1f}",
                f"{vit:.1f}",
                f"{t.step_s:.2f}",
                f"{t.tokens_per_s:,.0f}",
                f"{t.mfu:.1%}",
            ]
        )
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines.append(_row(head, widths))
    lines += [_row(r, widths) for r in rows]
    if len(p.ranked) > top:
        lines.append(f"... {len(p.ranked) - top} more runnable layouts in the JSON")
    if p.ranked:
        best = " ".join(pretrain_args(p.section, p.workload, p.ranked[0]))
        lines.append(f"rank 1 as navil-pretrain arguments: {best}")
    lines.append(
        "memory is the fullest pipeline stage's, per GPU; ViT share = the encoder's + "
        "connector's state and in-flight activations"
    )
    if p.too_big:
        lines.append(
            f"{len(p.too_big)} layouts run but do not fit, e.g. "
            + "; ".join(f"{k}: needs {g:.0f} GiB ({what})" for k, g, what in p.too_big[:3])
        )
    if p.refused:
        if show_refused:
            lines.append("refused layouts:")
            lines += [f"  {k}: {r}" for k, r in p.refused]
        else:
            lines.append(
                f"{len(p.refused)} layouts refused by the project's rules "
                "(--show-refused lists them with the reason)"
            )
    return "\n".join(lines)


def fit_summary(result: dict) -> str:
    lines = [f"cells used: {result['cells_used']} of {result['cells_total']}"]
    for f in result["data_fits"]:
        lines.append(
            f"(a) {f['llm']} x {f['vit']}: L = {f['E']:.3f} + {f['A']:.3g} D^-{f['alpha']:.3f}"
            f"  (n={f['n']}, R2={f['r2']:.3f})"
        )
    for f in result["vit_fits"]:
        where = f"(b) {f['llm']} @ {f['budget_samples']:g} samples"
        if f["v_opt"] is not None:
            lines.append(f"{where}: V_opt = {f['v_opt']:.4g} parameters")
        else:
            bound = {"lower": "<=", "upper": ">="}.get(f["edge"])
            text = f"V_opt {bound} {f['best_measured']:.4g}" if bound else "no clear minimum"
            lines.append(f"{where}: {text} (edge of the grid, not extrapolated)")
    for law in result["laws"]:
        ci = law["b_ci95"]
        ci_text = f" [95% CI {ci[0]:.2f}, {ci[1]:.2f}]" if ci else " (no CI: two points)"
        lines.append(
            f"(c) @ {law['budget_samples']:g} samples: log V_opt = {law['a']:.3f} + "
            f"{law['b']:.3f}{ci_text} log L  (n={law['n']}, billions)"
        )
    if result["law"] is None:
        lines.append("(c) no joint law could be fitted (see the problems)")
    lines += [f"problem: {p}" for p in result["problems"]]
    return "\n".join(lines)
