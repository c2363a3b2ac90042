"""Parts 1-3 of the step benchmark (bench_step.py): the NaViL decoder layer beside Megatron's
dense GPT layer, FP8 recipes over bf16 on a NaViL-9B stack, the vision encoder blocks."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_navil.utils.logging import get_logger  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step_common import (  # noqa: E402
    FLAVORS,
    TARGETS,
    VISUAL_SHARES,
    Deadline,
    Sizes,
    device,
    make_pack,
    measure,
    pack_facts,
    precision_for,
    ratio,
    tflops,
)

log = get_logger("bench_step")


# ----------------------------------------------------------------------------- decoder stacks
def layer_inputs(cfg, batch, backend, dtype):
    """hidden [T,1,D] (a leaf needing grad), output grad, RoPE, THD params, routing."""
    from megatron_navil.geometry.rope import rope_1d
    from megatron_navil.models.modality import ModalityRouting
    from megatron_navil.models.packing import packed_params

    dev = device()
    t, d = batch.num_tokens, cfg.llm.hidden_size
    seqlens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    hidden = (torch.randn(t, 1, d, device=dev) * 0.5).to(dtype).requires_grad_(True)
    return {
        "hidden": hidden,
        "grad": torch.randn(t, 1, d, device=dev).to(dtype),
        "freqs": rope_1d(batch.position_ids.to(dev), cfg.llm.kv_channels, cfg.llm.rope_theta),
        "dense_freqs": rope_1d(
            torch.arange(max(seqlens), device=dev), cfg.llm.kv_channels, cfg.llm.rope_theta
        ),
        "packed": packed_params(seqlens, dev),
        "routing": ModalityRouting.build(
            cfg.visual_token_mask(batch.tokens).to(dev), row_multiple=backend.fp8_row_multiple
        ),
    }


def navil_stack(cfg, precision, num_layers: int):
    """`num_layers` of our decoder layers through models/specs.py, as NaViLLanguageModel
    builds them (final norm included); (block, backend)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_navil.config.parallel import ParallelConfig
    from megatron_navil.models.backends import get_backend, use_grouped_experts
    from megatron_navil.models.layer import NaViLTransformerBlock
    from megatron_navil.models.specs import block_submodules, llm_layer_spec
    from megatron_navil.models.transformer_config import llm_transformer_config

    cfg = cfg.apply_overrides({"llm.num_layers": num_layers}, parse=False)
    name = precision.backend
    grouped = use_grouped_experts(name, (True, True))
    backend = get_backend(name, row_multiple=precision.row_multiple(), grouped_experts=grouped)
    config = llm_transformer_config(cfg, ParallelConfig(), precision, name, grouped)
    block = NaViLTransformerBlock(
        config,
        block_submodules(llm_layer_spec(cfg, backend), num_layers, backend.rms_norm),
        pre_process=True,
        post_process=True,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    return block.to(device()), backend, config


def dense_stack(navil_config, cfg, backend):
    """Megatron-Core's dense GPT layers of the same activated shape (one SwiGLU FFN, one QKV):
    the TE spec on a GPU; on CPU the local spec with our THD core attention (Megatron's local
    attention takes no packed sequences)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_block import TransformerBlock

    config = dataclasses.replace(
        navil_config, num_moe_experts=None, moe_ffn_hidden_size=None, moe_grouped_gemm=False
    )
    qk = cfg.llm.qk_layernorm
    if backend.name == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=qk, normalization="RMSNorm")
        spec.submodules.self_attention.submodules.core_attention = megatron_call(
            backend.core_attention
        )
    return TransformerBlock(config, spec).to(device())


def megatron_call(core_attention: type) -> type:
    """Our THD core attention with the call signature Megatron's SelfAttention uses (mask and
    bias arguments, which THD attention does not need)."""

    class MegatronCallAttention(core_attention):
        def forward(self, query, key, value, attention_mask=None, *, packed_seq_params, **_):
            return super().forward(query, key, value, packed_seq_params)

    return MegatronCallAttention


def run_navil(block, x) -> None:
    out = block(
        x["hidden"],
        rotary_freqs=x["freqs"],
        packed_seq_params=x["packed"],
        routing=x["routing"],
    )
    out.backward(x["grad"])


def run_dense(block, x) -> None:
    out = block(
        x["hidden"],
        attention_mask=None,
        rotary_pos_emb=x["dense_freqs"],
        packed_seq_params=x["packed"],
    )
    out.backward(x["grad"])


def layer_flops(cfg, batch) -> float:
    """Model FLOPs of one decoder layer (fwd + bwd, everything trains, its input needs a
    gradient), padding excluded: the flops.py convention."""
    from megatron_navil.training.flop_rules import walk
    from megatron_navil.training.flops import ALL_PARTS, batch_counts, llm_layer_ops

    c = batch_counts(cfg, batch)
    return walk(llm_layer_ops(cfg, c.tokens - c.visual, c.visual, c.causal_pairs), ALL_PARTS, True)[
        0
    ].total


def part_layers(sizes: Sizes, deadline: Deadline) -> dict[str, Any]:
    """1. NaViL layer vs the dense Megatron layer, per flavor and visual share."""
    from megatron_navil.config.flavors import get_flavor

    rows = []
    jobs = [(f, s) for f in FLAVORS for s in VISUAL_SHARES]
    for i, (flavor, share) in enumerate(jobs):
        allowance = deadline.left() / (len(jobs) - i) / 2 * 0.6  # two stacks, build time aside
        cfg = get_flavor(sizes.flavor(flavor))
        precision = precision_for(sizes)
        batch = make_pack(
            cfg, sizes.seq_length, share, sizes.grid_range, seed=11 + i, fill=sizes.fill
        )
        n = sizes.layer_stack
        navil, backend, config = navil_stack(cfg, precision, n)
        x = layer_inputs(cfg, batch, backend, config.params_dtype)
        ours = measure(lambda: run_navil(navil, x), sizes, allowance)
        navil = None  # free it before the dense stack is built
        dense = dense_stack(config, cfg, backend)
        theirs = measure(lambda: run_dense(dense, x), sizes, allowance)
        dense = None
        flop = layer_flops(cfg, batch)
        row = {
            "flavor": flavor,
            "model": sizes.flavor(flavor),
            "visual_target": share,
            **pack_facts(cfg, batch),
            "layers_timed": n,
            "navil_ms": ours["ms"] / n,
            "dense_ms": theirs["ms"] / n,
            "navil_tflops": tflops(flop, ours["ms"] / n),
            "dense_tflops": tflops(flop, theirs["ms"] / n),
            "iters": ours["iters"],
        }
        row["ratio"] = ratio(row["dense_ms"], row["navil_ms"])  # speed NaViL / dense
        rows.append(row)
        log.info("layers %s %.0f%%: ratio %.3f", flavor, share * 100, row["ratio"])
    return {"status": "ok", "rows": rows, "target": TARGETS["layer_ratio"]}


# ----------------------------------------------------------------------------- FP8
def fp8_recipes() -> list[str]:
    """Every value of precision.fp8 (config/parallel.py), in the config's order."""
    from megatron_navil.config.parallel import PrecisionConfig

    hint = typing.get_type_hints(PrecisionConfig)["fp8"]
    return [a for a in typing.get_args(typing.get_args(hint)[0])]


def fp8_unsupported(recipe: str) -> Optional[str]:
    """Why `recipe` cannot run here (None: it can)."""
    from megatron_navil.config.base import ConfigError
    from megatron_navil.models.backends import te_available
    from megatron_navil.models.fp8 import check_device_fp8

    if not torch.cuda.is_available():
        return "needs a GPU (dry run)"
    if not te_available():
        return "needs Transformer Engine"
    try:
        check_device_fp8(recipe)
    except ConfigError as e:
        return str(e).splitlines()[0][:200]
    return None


def part_fp8(sizes: Sizes, deadline: Deadline) -> dict[str, Any]:
    """2. A NaViL-9B layer stack, bf16 vs each FP8 recipe the device supports."""
    from megatron_navil.config.flavors import get_flavor

    cfg = get_flavor(sizes.flavor("navil-9b"))
    batch = make_pack(cfg, sizes.seq_length, 0.3, sizes.grid_range, seed=21, fill=sizes.fill)
    flop = layer_flops(cfg, batch) * sizes.fp8_layers
    recipes = fp8_recipes()
    runnable = [r for r in recipes if fp8_unsupported(r) is None]
    rows: dict[str, dict[str, Any]] = {}
    for i, recipe in enumerate([None, *recipes]):
        key = recipe or "bf16"
        why = fp8_unsupported(recipe) if recipe else None
        if why:
            rows[key] = {"status": "skipped", "reason": why}
            continue
        allowance = deadline.left() / (1 + len(runnable)) * 0.6
        block, backend, config = navil_stack(cfg, precision_for(sizes, recipe), sizes.fp8_layers)
        x = layer_inputs(cfg, batch, backend, config.params_dtype)
        m = measure(lambda: run_navil(block, x), sizes, allowance)
        block = None
        rows[key] = {
            "status": "ok",
            "ms": m["ms"],
            "tflops": tflops(flop, m["ms"]),
            "iters": m["iters"],
        }
    base = rows["bf16"].get("ms")
    for key, row in rows.items():
        if key != "bf16" and row.get("ms"):
            row["speedup"] = ratio(base, row["ms"])
    best = max((r["speedup"] for r in rows.values() if r.get("speedup")), default=None)
    return {
        "status": "ok",
        "model": sizes.flavor("navil-9b"),
        "layers": sizes.fp8_layers,
        **pack_facts(cfg, batch),
        "rows": rows,
        "best_speedup": best,
        "target": TARGETS["fp8_speedup"],
    }


# ----------------------------------------------------------------------------- ViT
def vit_grids(sizes: Sizes, seed: int) -> list[tuple[int, int, int]]:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = sizes.grid_range
    grids, total = [], 0
    while total < sizes.vit_patches:
        h = 2 * int(torch.randint(lo // 2, hi // 2 + 1, (1,), generator=gen))
        w = 2 * int(torch.randint(lo // 2, hi // 2 + 1, (1,), generator=gen))
        grids.append((1, h, w))
        total += h * w
    return grids


def vit_flops(cfg, grids) -> float:
    """Patch embedding + encoder layers, fwd + bwd with the ViT trained (the connector is not
    run here, so its ops are left out)."""
    from megatron_navil.training.flop_rules import walk
    from megatron_navil.training.flops import vision_ops, vision_pairs

    g = torch.tensor(grids)
    full, window = vision_pairs(cfg, g)
    patches = float(g.prod(dim=1).sum())
    ops = [op for op in vision_ops(cfg, patches, full, window) if op.part != "connector"]
    return walk(ops, frozenset({"vision"}), False)[0].total


def part_vit(sizes: Sizes, deadline: Deadline) -> dict[str, Any]:
    """3. The vision encoder of each flavor, a few blocks, per-image THD attention."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_navil.config.flavors import get_flavor
    from megatron_navil.config.parallel import ParallelConfig
    from megatron_navil.models.backends import get_backend
    from megatron_navil.models.transformer_config import vision_transformer_config
    from megatron_navil.models.vision import VisionEncoder

    rows = []
    for i, flavor in enumerate(FLAVORS):
        allowance = deadline.left() / (len(FLAVORS) - i) * 0.6
        cfg = get_flavor(sizes.flavor(flavor)).apply_overrides(
            {"vision.num_layers": sizes.vit_layers}, parse=False
        )
        precision = precision_for(sizes)
        backend = get_backend(precision.backend)
        config = vision_transformer_config(cfg, ParallelConfig(), precision, precision.backend)
        pgc = ProcessGroupCollection.use_mpu_process_groups()
        enc = VisionEncoder(cfg, config, backend, pgc).to(device())
        grids = vit_grids(sizes, seed=31 + i)
        n = sum(t * h * w for t, h, w in grids)
        patch_dim = cfg.vision.num_channels * cfg.vision.patch_size**2
        pixels = torch.rand(n, patch_dim, device=device()).to(config.params_dtype)
        grid_thw = torch.tensor(grids, device=device())
        grad = torch.randn(n, cfg.vision.hidden_size, device=device()).to(config.params_dtype)

        def run():
            enc(pixels, grid_thw).backward(grad)

        m = measure(run, sizes, allowance)
        enc = None
        rows.append(
            {
                "flavor": flavor,
                "model": sizes.flavor(flavor),
                "width": cfg.vision.hidden_size,
                "layers_timed": sizes.vit_layers,
                "images": len(grids),
                "patches": n,
                "ms": m["ms"],
                "ms_per_layer": m["ms"] / sizes.vit_layers,
                "tflops": tflops(vit_flops(cfg, grids), m["ms"]),
                "iters": m["iters"],
            }
        )
    return {"status": "ok", "rows": rows, "target": TARGETS["vit_tflops"]}
