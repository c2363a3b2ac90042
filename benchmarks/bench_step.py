"""Step benchmark of issue 11: NaViL layers vs dense, FP8, the ViT, a full NaViL-2B step.

    PYTHONPATH=/tmp/site:. python benchmarks/bench_step.py --out $OUT        # GPU machine
    PYTHONPATH=. python benchmarks/bench_step.py --dry-run --out /tmp/bs      # CPU: the logic

Run by the `step` section of benchmarks/gpu_check.py (docs/gpu.md). In one process, within
`--budget` seconds (parts that no longer fit are recorded as skipped, with the reason), it
measures with warm-up then timed iterations (CUDA events on a GPU, time.perf_counter on CPU):
1. layers: our NaViL decoder layer (MHA-MMoE + FFN-MMoE, built through models/specs.py) beside
   Megatron-Core's dense GPT layer of the same activated shape (TE spec on a GPU, the local
   spec with our THD core attention on CPU), packed THD, navil-2b and navil-9b shapes, 30% and
   60% visual tokens: ms fwd+bwd, TFLOP/s (training/flops.py counts) and NaViL/dense.
2. fp8: a NaViL-9B layer stack in bf16 and in every FP8 recipe precision.fp8 offers that this
   device supports (models/fp8.py): ms and bf16/FP8 speed-up.
3. vit: the 2B/9B vision encoders (a few blocks) on images of 32x48 to 64x64 patches, per-image
   THD attention: TFLOP/s.
4. step: the full NaViL-2B training step through the real Trainer (ViT + connector + LLM + loss,
   Megatron DDP + distributed optimizer) on realistic packs (several images plus text samples,
   30%/60% visual tokens), stage 1 and full training: step ms, MFU (flops.py convention, vision
   counted), peak memory. At reduced depth when full depth does not fit the time left (labelled,
   with a per-layer extrapolation from parts 1 and 3).
5. host_syncs: calls that block the host per micro-batch (megatron_navil/utils/host_syncs.py,
   "not available" in a checkout without it).
6. profile: the top 15 kernels (CUDA time; CPU time in a dry run) of one profiled step.
7. switches: each optimisation switch of SWITCHES on and off for the step (reduced depth);
   a switch whose config field is not in this checkout is recorded as such.
The dry run (`--dry-run`) runs every part on CPU with the debug flavors standing in for
navil-2b/9b (same backbone layouts, tiny widths), fp32, the local backend; FP8 is recorded as
skipped there. Results: <out>/bench_step_results.json (rewritten after each part), a markdown
table printed last. The GPU result belongs in benchmarks/bench_step_results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
import typing
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_navil.utils.logging import get_logger  # noqa: E402

log = get_logger("bench_step")

RESULTS_NAME = "bench_step_results.json"
PARTS = ("layers", "vit", "fp8", "step", "host_syncs", "profile", "switches")
VISUAL_SHARES = (0.3, 0.6)
TARGETS = {"layer_ratio": 0.97, "fp8_speedup": 1.2, "vit_tflops": 400.0, "step_mfu": 0.5}
FLAVORS = ("navil-2b", "navil-9b")
# The dry run's stand-ins: the same backbone layouts (composed vs separate output projection,
# q/k norms) at debug widths.
DRY_FLAVORS = {"navil-2b": "debug-internlm2", "navil-9b": "debug-qwen3"}

# (label, dotted PretrainConfig path, on value, off value, overrides both runs need, needs TE).
# Fields added on other branches are looked up at run time: absent -> "not in this checkout".
SWITCHES: tuple[tuple[str, str, Any, Any, dict, bool], ...] = (
    ("fused SwiGLU", "precision.bias_swiglu_fusion", True, False, {}, False),
    # TE's fused wgrad GEMMs: the local backend refuses it (config/parallel.py)
    ("grad-accum fusion", "precision.gradient_accumulation_fusion", True, False, {}, True),
    ("padding trim", "training.trim_padding", True, False, {}, False),
    (
        "overlap_param_gather",
        "optimizer.overlap_param_gather",
        True,
        False,
        # Megatron needs both for the parameter-gather overlap
        {"optimizer.use_distributed_optimizer": True, "optimizer.overlap_grad_reduce": True},
        False,
    ),
    ("chunked LM head + CE", "precision.lm_head_loss_chunk_rows", 4096, 0, {}, False),
    ("host pack metadata", "data.host_pack_metadata", True, False, {}, False),
)


# ----------------------------------------------------------------------------- sizes
@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""

    gpu: bool
    seq_length: int
    grid_range: tuple[int, int]
    """Image sides in patches (even: whole 2x2 merge blocks), min and max."""
    layer_stack: int
    """Decoder layers per timed stack in the layer comparison."""
    fp8_layers: int
    vit_layers: int
    vit_patches: int
    """Patches per timed ViT pack."""
    reduced_depth: tuple[int, int]
    """(LLM, ViT) layers of the switch runs and of the step when full depth does not fit."""
    micro_batches: int
    warmup: int
    max_iters: int
    min_iters: int
    step_warmup: int
    step_max_iters: int
    step_full_depth_s: float
    """Seconds a full-depth step run (build, warm-up, timed steps) is expected to need: a run
    with less time left is made at reduced_depth."""
    fill: float = 0.97
    """Share of each pack the samples use (the rest is padding, as the packer leaves it). The
    dry run's is lower so that padding trim (training.trim_padding, multiples of 16) has
    something to cut there too."""
    reduced_runs: tuple[str, ...] = ()
    """Step runs always made at reduced depth (the dry run: exercises that path and the
    extrapolation)."""

    def flavor(self, name: str) -> str:
        return name if self.gpu else DRY_FLAVORS[name]


GPU_SIZES = Sizes(True, 8192, (32, 64), 2, 4, 4, 16384, (4, 4), 2, 3, 20, 3, 2, 5, 35.0)
DRY_SIZES = Sizes(
    False, 384, (4, 8), 1, 2, 1, 256, (2, 1), 2, 1, 2, 2, 1, 2, 1.0, 0.9, ("full+recompute",)
)


class Deadline:
    """The benchmark's wall-clock allowance."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


# ----------------------------------------------------------------------------- timing
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any]) -> float:
    """ms of one call: CUDA events on a GPU (device time between the two records), else
    perf_counter."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(fn: Callable[[], Any], sizes: Sizes, allowance_s: float) -> dict[str, Any]:
    """Warm-up, then as many timed calls as fit `allowance_s` (between min_iters and
    max_iters, sized from the last warm-up call): median and all ms."""
    first = 0.0
    for _ in range(sizes.warmup):
        first = time_call(fn)
    iters = int(allowance_s * 1e3 / max(first, 1e-3))
    iters = max(sizes.min_iters, min(sizes.max_iters, iters))
    ms = [time_call(fn) for _ in range(iters)]
    return {"ms": statistics.median(ms), "ms_all": [round(x, 3) for x in ms], "iters": iters}


def tflops(flop: float, ms: Optional[float]) -> Optional[float]:
    """TFLOP/s of `flop` model FLOPs in `ms` milliseconds."""
    return flop / (ms * 1e-3) / 1e12 if ms else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def peak_gib() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


# ----------------------------------------------------------------------------- packs
def realistic_samples(
    cfg,
    seq_length: int,
    share: float,
    grid_range: tuple[int, int],
    gen: torch.Generator,
    fill: float = 0.97,
) -> list[list[object]]:
    """Samples for one pack: image samples (1-2 images of grid_range patches a side, with a
    caption/question of 16-200 tokens) while they bring the pack's visual tokens closer to
    `share` of it, then text-only samples (64-1500 tokens) until `fill` of it is used (text
    lengths scale with seq_length / 8192 for the dry run's short packs). Visual tokens are
    counted with the model's own mask on the real layout (data/layout.image_token_ids: row
    separators and </img> are text)."""
    from megatron_navil.data.layout import image_token_ids

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def side() -> int:
        return 2 * randint(grid_range[0] // 2, grid_range[1] // 2)  # whole 2x2 merge blocks

    scale = seq_length / 8192  # text lengths below are for 8192-token packs
    fill = int(seq_length * fill)
    target = share * fill
    samples: list[list[object]] = []
    visual = used = 0
    for _ in range(64):  # attempts: a candidate that overshoots is dropped, a smaller may fit
        # two-image samples while far from the target, one image near it (finer steps)
        count = randint(1, 2) if target - visual > 0.3 * target else 1
        images = [(side(), side()) for _ in range(count)]
        ids = [t for g in images for t in image_token_ids(cfg, [g])]
        n_vis = int(cfg.visual_token_mask(torch.tensor(ids)).sum())
        text = randint(max(2, int(16 * scale)), max(4, int(200 * scale)))
        if used + len(ids) + text <= fill and abs(visual + n_vis - target) < abs(visual - target):
            samples.append([text // 2, *[[g] for g in images], text - text // 2])
            visual, used = visual + n_vis, used + len(ids) + text
    while used < fill:  # the rest stays padding, as the packer leaves it
        n = min(randint(max(8, int(64 * scale)), max(16, int(1500 * scale))), fill - used)
        if n < 4:
            break
        samples.append([n])
        used += n
    return samples


def make_pack(cfg, seq_length: int, share: float, grid_range, seed: int, fill: float = 0.97):
    from megatron_navil.data.synthetic import synthetic_batch

    gen = torch.Generator().manual_seed(seed)
    samples = realistic_samples(cfg, seq_length, share, grid_range, gen, fill)
    return synthetic_batch(cfg, seq_length, gen, samples, text_vocab=1000)


def pack_facts(cfg, batch) -> dict[str, Any]:
    from megatron_navil.training.flops import batch_counts

    c = batch_counts(cfg, batch)
    images = 0 if batch.grid_thw is None else int(batch.grid_thw.shape[0])
    return {
        "tokens": batch.num_tokens,
        "real_tokens": int(c.tokens),
        "visual_share": round(c.visual / max(c.tokens, 1), 3),
        "samples": int(batch.metadata.get("samples", 0)),
        "images": images,
        "patches": int(c.patches),
    }


def attach_pack_meta(cfg, batch, on: bool):
    """What the loader does with data.host_pack_metadata on: the pack's host-side metadata
    (megatron_navil/pack_meta.py) and, on a CUDA machine, page-locked tensors (the CPU-decode
    path of data/loader.py: asynchronous copies to the GPU). Unchanged when off, or in a
    checkout without pack metadata."""
    if not on or not hasattr(batch, "pack_meta"):
        return batch
    try:
        from megatron_navil.data.cuda_handoff import CudaHandoff
        from megatron_navil.pack_meta import PackMeta
    except ImportError:
        return batch
    batch.pack_meta = PackMeta.build(cfg, batch)
    if torch.cuda.is_available():
        CudaHandoff(None, pin_device=torch.cuda.current_device()).seal(batch)
    return batch


# ----------------------------------------------------------------------------- environment
def device_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name()
        facts["capability"] = "%d.%d" % torch.cuda.get_device_capability()
        facts["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for mod in ("megatron.core", "transformer_engine"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            facts[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # TE is absent on CPU: record why
            facts[mod] = f"not available ({type(e).__name__})"
    return facts


def backend_name(gpu: bool) -> str:
    from megatron_navil.models.backends import te_available

    return "transformer_engine" if gpu and te_available() else "local"


def precision_for(sizes: Sizes, fp8: Optional[str] = None):
    from megatron_navil.config.parallel import PrecisionConfig

    return PrecisionConfig(
        backend=backend_name(sizes.gpu),
        params_dtype="bfloat16" if sizes.gpu else "float32",
        fp8=fp8,
    )


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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


# ----------------------------------------------------------------------------- full step
class PackStream:
    """The Trainer's loader replaced by fixed realistic packs (cycled), with the interface the
    Trainer reads (state_dict, counters, close); remembers what it served for the FLOP count."""

    def __init__(self, packs: list):
        self.packs, self.position, self.served = packs, 0, []
        self.counters: dict[str, int] = {}

    def __iter__(self):
        return self

    def __next__(self):
        pack = self.packs[self.position % len(self.packs)]
        self.position += 1
        self.served.append(pack)
        return pack

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def close(self) -> None:
        pass


def has_field(obj, dotted: str) -> bool:
    """Whether the config has this dotted field (a dataclass field at every level)."""
    for name in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or name not in {
            f.name for f in dataclasses.fields(obj)
        }:
            return False
        obj = getattr(obj, name)
    return True


# The example 2B config's optimizer settings (examples/configs/navil_2b_stage1.yaml).
STEP_OPTIMIZER = {
    "optimizer.use_distributed_optimizer": True,
    "optimizer.overlap_grad_reduce": True,
    "optimizer.overlap_param_gather": True,
}


def step_overrides(sizes: Sizes, preset: str, depth: Optional[tuple[int, int]]) -> dict:
    over = {
        "model.flavor": sizes.flavor("navil-2b"),
        "training.seq_length": sizes.seq_length,
        "training.global_batch_size": sizes.micro_batches,
        "training.train_iters": 1000,
        "stage.preset": preset,
        "precision.params_dtype": "bfloat16" if sizes.gpu else "float32",
        "precision.backend": backend_name(sizes.gpu),
        "logging.progress_bar": "off",
        **STEP_OPTIMIZER,
    }
    if depth is not None:
        over.update({"model.llm.num_layers": depth[0], "model.vision.num_layers": depth[1]})
    return over


def build_trainer(overrides: dict):
    from megatron_navil.config.pretrain import PretrainConfig
    from megatron_navil.training.trainer import Trainer

    cfg = PretrainConfig(mock_data=True).apply_overrides(overrides, parse=False)
    return Trainer(cfg)


def step_packs(trainer, sizes: Sizes) -> list:
    """The micro-batches of one step: half at 30%, half at 60% visual tokens (realistic image
    mix), with host metadata when the config asks for it (and the checkout has it)."""
    meta_on = bool(getattr(trainer.cfg.data, "host_pack_metadata", False))
    packs = []
    for i in range(sizes.micro_batches):
        share = VISUAL_SHARES[i % len(VISUAL_SHARES)]
        b = make_pack(
            trainer.model_cfg,
            sizes.seq_length,
            share,
            sizes.grid_range,
            seed=41 + i,
            fill=sizes.fill,
        )
        packs.append(attach_pack_meta(trainer.model_cfg, b, meta_on))
    return packs


def step_pack_facts(trainer, batch) -> dict[str, Any]:
    """pack_facts plus the tokens the model runs on after the trainer's padding trim."""
    facts = pack_facts(trainer.model_cfg, batch)
    trim = getattr(trainer, "trim_multiple", None)  # training.trim_padding (issue11-switches)
    facts["tokens_run"] = batch.trim_padding(trim).num_tokens if trim else batch.num_tokens
    return facts


def time_steps(trainer, sizes: Sizes, allowance_s: float) -> dict[str, Any]:
    """Warm-up steps, then timed steps: ms, model FLOPs per step (the trainer's convention:
    trained parts, padding out), MFU, peak memory."""
    from megatron_navil.training.flops import micro_batch_count, peak_tflops

    stream = PackStream(step_packs(trainer, sizes))
    trainer.train_loader = stream
    for chunk in trainer.chunks:
        chunk.train()
    records = []
    m_first = 0.0
    for _ in range(sizes.step_warmup):  # the first step also makes the optimizer state
        m_first = time_call(lambda: records.append(trainer.train_step()))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    iters = int(allowance_s * 1e3 / max(m_first, 1e-3))
    iters = max(sizes.min_iters, min(sizes.step_max_iters, iters))
    stream.served.clear()
    ms = [time_call(lambda: records.append(trainer.train_step())) for _ in range(iters)]
    flop = sum(
        micro_batch_count(trainer.model_cfg, b, trainer.trained).total for b in stream.served
    )
    step_flop = flop / iters
    peak = peak_tflops(getattr(trainer.cfg.logging, "peak_tflops", None)) or 989.0
    med = statistics.median(ms)
    trained = sum(p.numel() for c in trainer.chunks for p in c.parameters() if p.requires_grad)
    return {
        "ms": med,
        "ms_all": [round(x, 2) for x in ms],
        "iters": iters,
        "tflop_per_step": step_flop / 1e12,
        "tflops": tflops(step_flop, med),
        "mfu": tflops(step_flop, med) / peak,
        "peak_tflops": peak,
        "peak_mem_gib": peak_gib(),
        "trained_params": trained,
        **dp8_estimate(peak_gib(), trained),
        "losses": [r.get("loss") for r in records],
        "packs": [step_pack_facts(trainer, b) for b in stream.packs],
    }


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dp8_estimate(peak: Optional[float], trained: int) -> dict[str, Any]:
    """The peak on one GPU of an 8-GPU node (the example config's layout), estimated: there the
    distributed optimizer keeps 1/8 of its fp32 master weights and Adam moments (12 bytes per
    trained parameter) on each GPU; everything else (bf16 weights, fp32 grad buffer,
    activations) is per GPU already. On one GPU nothing is sharded."""
    state = 12 * trained / 2**30
    if peak is None:
        return {"optimizer_state_gib": state}
    return {"optimizer_state_gib": state, "peak_mem_gib_dp8_estimate": peak - state * 7 / 8}


def release(trainer) -> Optional[float]:
    """Free the trainer's GPU memory before the next one is built; GiB still allocated after
    (recorded: memory a freed trainer leaves behind would shrink the next run's room)."""
    trainer.chunks = trainer.optimizer = trainer.scheduler = None
    del trainer
    free_memory()
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def step_runs(sizes: Sizes) -> list[tuple[str, str, Optional[str]]]:
    """(label, stage preset, recompute granularity). The docs name no recompute policy for one
    GPU: stage 1 runs without; full training without and with full (uniform, 1 layer) recompute,
    the one that keeps activations to a layer input each (docs/scaling.md)."""
    return [("stage1", "stage1", None), ("full", "full", None), ("full+recompute", "full", "full")]


def extrapolate(
    row: dict, depth: tuple[int, int], full: tuple[int, int], per_layer
) -> Optional[float]:
    """Full-depth step ms from a reduced-depth one plus per-layer ms of parts 1 and 3 (an
    estimate: it assumes every layer costs what the isolated layer cost)."""
    llm_ms, vit_ms = per_layer
    if llm_ms is None or vit_ms is None:
        return None
    micro = row["micro_batches"]
    return row["ms"] + micro * ((full[0] - depth[0]) * llm_ms + (full[1] - depth[1]) * vit_ms)


def step_row(label: str, sizes: Sizes, depth, full_depth, recompute, fits: bool) -> dict:
    row: dict[str, Any] = {
        "run": label,
        "model": sizes.flavor("navil-2b"),
        "depth": list(depth or full_depth),
        "full_depth": depth is None,
        "micro_batches": sizes.micro_batches,
        "recompute": recompute,
    }
    if depth is not None:
        row["note"] = (
            "reduced depth: full depth did not fit the time left"
            if not fits
            else "reduced depth (dry run: exercises the fallback)"
        )
    return row


def step_extras(trainer, label: str, rec: "Recorder") -> None:
    """Profile and host syncs on the first step run that trained (the real full-depth model
    when it fits), so those parts need no model of their own."""
    for name, fn in (
        ("profile", profile_step),
        ("host_syncs", lambda t: count_host_syncs(t, t.train_loader.packs[0])),
    ):
        if name not in rec.selected or name in rec.results["parts"]:
            continue
        t0 = time.monotonic()
        out = guarded(lambda: fn(trainer))
        out.update(run=label, depth=rec.results["parts"]["step"]["rows"][-1]["depth"])
        out["seconds"] = round(time.monotonic() - t0, 2)
        rec.put(name, out)


def part_step(sizes: Sizes, deadline: Deadline, rec: "Recorder") -> dict[str, Any]:
    """4. The full NaViL-2B step (stage 1, full training) through the Trainer; on the first
    run that trains, also 5. host syncs and 6. the profile."""
    from megatron_navil.config.flavors import get_flavor

    full_cfg = get_flavor(sizes.flavor("navil-2b"))
    full_depth = (full_cfg.llm.num_layers, full_cfg.vision.num_layers)
    runs = step_runs(sizes)
    out: dict[str, Any] = {
        "status": "running",
        "rows": [],
        "target_mfu": TARGETS["step_mfu"],
        "full_depth": list(full_depth),
    }
    for i, (label, preset, recompute) in enumerate(runs):
        t0 = time.monotonic()
        fits = deadline.left() >= sizes.step_full_depth_s
        depth = None if fits and label not in sizes.reduced_runs else sizes.reduced_depth
        over = step_overrides(sizes, preset, depth)
        if recompute:
            over["parallel.recompute_granularity"] = recompute
        row = step_row(label, sizes, depth, full_depth, recompute, fits)
        out["rows"].append(row)
        try:
            trainer = build_trainer(over)
        except Exception as e:  # e.g. out of memory at full depth: recorded, the next run goes on
            row.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
            trainer = None
        if trainer is None:
            free_memory()  # here, not in the except clause: its traceback holds the tensors
            rec.put("step", out)
            continue
        try:
            row.update(time_steps(trainer, sizes, deadline.left() / (len(runs) - i) * 0.3))
            row["status"] = "ok"
            rec.put("step", out)
            step_extras(trainer, label, rec)
        except Exception as e:
            row.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
        finally:
            row["gib_left_after_release"] = release(trainer)
        row["seconds"] = round(time.monotonic() - t0, 2)
        if depth is not None and row.get("ms"):
            est = extrapolate(row, depth, full_depth, per_layer_ms(rec.results))
            row["ms_full_depth_estimate"] = est
        rec.put("step", out)  # a kill during the next run keeps this one
    out["status"] = "ok" if any(r.get("status") == "ok" for r in out["rows"]) else "failed"
    return out


def per_layer_ms(results: dict) -> tuple[Optional[float], Optional[float]]:
    """navil-2b's decoder layer (mean over the visual shares) and ViT layer ms from parts 1, 3."""
    parts = results["parts"]
    llm = [
        r["navil_ms"] for r in parts.get("layers", {}).get("rows", []) if r["flavor"] == "navil-2b"
    ]
    vit = [
        r["ms_per_layer"] for r in parts.get("vit", {}).get("rows", []) if r["flavor"] == "navil-2b"
    ]
    return (statistics.mean(llm) if llm else None, statistics.mean(vit) if vit else None)


# ----------------------------------------------------------------------------- syncs, profile
def count_host_syncs(trainer, batch) -> dict[str, Any]:
    """Calls that would block the host, for one micro-batch of the training step (forward_step,
    loss, backward), as benchmarks/host_syncs.py counts them on issue11-hostsync."""
    try:
        from megatron_navil.utils.host_syncs import HostSyncCounter
    except ImportError:
        return {"status": "skipped", "reason": "not available (megatron_navil.utils.host_syncs)"}
    from megatron_navil.training.step import forward_step

    def count(b):
        model = trainer.chunks[0]
        # torch.compile'd kernels (Megatron's fused SwiGLU) run eagerly while counted: a
        # function mode around a compiled function would make dynamo recompile it
        with eager(), HostSyncCounter() as c:
            output, loss_fn = forward_step(iter([b]), model)
            loss_sum, num_tokens, _ = loss_fn(output)
            (loss_sum / num_tokens).backward()
        model.zero_grad_buffer()
        return c

    c = count(batch)
    rec = {
        "status": "ok",
        "syncs_per_micro_batch": len(c.syncs),
        "h2d_per_micro_batch": len(c.h2d),
        "top_sites": dict(list(c.by_site().items())[:10]),
    }
    if getattr(batch, "pack_meta", None) is not None:  # the same pack, metadata on the device
        off = count(dataclasses.replace(batch, pack_meta=None))
        rec.update(syncs_without_pack_meta=len(off.syncs), h2d_without_pack_meta=len(off.h2d))
    return rec


def eager():
    """torch.compile'd functions run eagerly inside (a null context on an older torch)."""
    import contextlib

    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def profile_step(trainer) -> dict[str, Any]:
    """One training step under torch.profiler: the 15 kernels with the most device time (ops
    with the most self CPU time without a GPU), with their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        trainer.train_step()
        sync()
    events = list(prof.key_averages())
    gpu = torch.cuda.is_available()
    if gpu:
        # Kernel rows only: an operator's row also carries the device time of the kernels it
        # launched, which would count each kernel twice in the total.
        from torch.autograd import DeviceType

        kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
        events = kernels or events

    def self_us(e) -> float:
        if gpu:
            return float(
                getattr(e, "self_device_time_total", None)
                or getattr(e, "self_cuda_time_total", 0.0)
            )
        return float(e.self_cpu_time_total)

    total = sum(self_us(e) for e in events) or 1.0
    top = sorted(events, key=self_us, reverse=True)[:15]
    return {
        "status": "ok",
        "clock": "CUDA self time" if gpu else "CPU self time",
        "total_ms": total / 1e3,
        "top": [
            {
                "name": e.key[:120],
                "ms": self_us(e) / 1e3,
                "share": self_us(e) / total,
                "calls": e.count,
            }
            for e in top
        ],
    }


def part_syncs_and_profile(sizes: Sizes, deadline: Deadline, which: str) -> dict[str, Any]:
    """5./6. Host syncs or the profile on a reduced-depth 2B trainer (full training), when the
    step part made neither (it did not run, or no run of it trained)."""
    trainer = build_trainer(step_overrides(sizes, "full", sizes.reduced_depth))
    try:
        packs = step_packs(trainer, sizes)
        trainer.train_loader = PackStream(packs)
        for chunk in trainer.chunks:
            chunk.train()
        trainer.train_step()  # warm-up: kernels chosen, optimizer state made
        out = (
            count_host_syncs(trainer, packs[0]) if which == "host_syncs" else profile_step(trainer)
        )
    finally:
        release(trainer)
    out["depth"] = list(sizes.reduced_depth)
    return out


# ----------------------------------------------------------------------------- switches
def switch_plan(table=SWITCHES) -> list[dict[str, Any]]:
    """Each switch with whether its config field (and the fields it needs) exist here."""
    from megatron_navil.config.pretrain import PretrainConfig

    base = PretrainConfig(mock_data=True)
    plan = []
    for label, path, on, off, needs, needs_te in table:
        missing = [p for p in (path, *needs) if not has_field(base, p)]
        why = "not in this checkout: " + ", ".join(missing) if missing else None
        if why is None and needs_te and backend_name(torch.cuda.is_available()) == "local":
            why = "needs the transformer_engine backend (the local backend refuses it)"
        plan.append(
            {
                "label": label,
                "path": path,
                "on": on,
                "off": off,
                "needs": needs,
                "present": why is None,
                **({"reason": why} if why else {}),
            }
        )
    return plan


def switch_row(sw: dict, sizes: Sizes, allowance_s: float) -> dict[str, Any]:
    """Step ms with the switch on and off (everything else as the step's defaults)."""
    row = {k: sw[k] for k in ("label", "path", "on", "off")}
    for side in ("on", "off"):
        over = step_overrides(sizes, "full", sizes.reduced_depth)
        over.update(sw["needs"])
        over[sw["path"]] = sw[side]
        try:
            trainer = build_trainer(over)
        except Exception as e:  # e.g. a switch the local backend refuses (ConfigError)
            row[f"{side}_error"] = f"{type(e).__name__}: {e}"[:300]
            continue
        try:
            row[f"{side}_ms"] = time_steps(trainer, sizes, allowance_s / 2)["ms"]
        except Exception as e:
            row[f"{side}_error"] = f"{type(e).__name__}: {e}"[:300]
        finally:
            release(trainer)
    row["speedup"] = ratio(row.get("off_ms"), row.get("on_ms"))  # > 1: the switch helps
    row["status"] = "ok" if row["speedup"] is not None else "error"
    return row


def part_switches(sizes: Sizes, deadline: Deadline, rec: "Recorder") -> dict[str, Any]:
    """7. Each switch on/off for the step at reduced depth (saved after every switch)."""
    plan = switch_plan()
    out: dict[str, Any] = {"status": "running", "depth": list(sizes.reduced_depth), "rows": []}
    todo = sum(s["present"] for s in plan)
    for sw in plan:
        head = {"label": sw["label"], "path": sw["path"]}
        if not sw["present"]:
            row = {**head, "status": "skipped", "reason": sw["reason"]}
        elif deadline.left() < SWITCH_MIN_S * (1 if sizes.gpu else 0.01):
            row = {**head, "status": "skipped", "reason": "out of time budget"}
        else:
            row = switch_row(sw, sizes, deadline.left() / todo * 0.3)
            todo -= 1
        out["rows"].append(row)
        rec.put("switches", out)
    out["status"] = "ok"
    return out


SWITCH_MIN_S = 12.0
"""Seconds one switch needs on a GPU: two reduced-depth trainers and their steps."""


# ----------------------------------------------------------------------------- driver
# Seconds each part needs at least on a GPU (a part with less left is skipped), and the seconds
# it is planned to take: a part gets the time left in proportion to its plan among the parts
# still to run (its iteration counts are sized from that). The step's three full-depth runs
# (build ~20 s, 5-8 steps) are the largest item.
MIN_S = {
    "layers": 25,
    "vit": 10,
    "fp8": 20,
    "step": 40,
    "profile": 15,
    "host_syncs": 15,
    "switches": 20,
}
PLAN_S = {
    "layers": 25,
    "vit": 12,
    "fp8": 25,
    "step": 100,
    "profile": 10,
    "host_syncs": 10,
    "switches": 50,
}


class Recorder:
    """The results, saved atomically whenever a part (or a row of one) is recorded, so a
    benchmark killed at its timeout still leaves what it measured."""

    def __init__(self, results: dict, path: Path, selected: list[str]):
        self.results, self.path, self.selected = results, path, selected

    def put(self, name: str, record: dict) -> None:
        self.results["parts"][name] = record
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.path)


def guarded(fn: Callable[[], dict]) -> dict[str, Any]:
    """fn's record, or an 'error' record: the benchmark must finish and report every part."""
    try:
        return fn()
    except Exception as e:
        return {
            "status": "error",
            "reason": f"{type(e).__name__}: {e}"[:400],
            "traceback": traceback.format_exc().splitlines()[-8:],
        }


def run_part(name: str, sizes: Sizes, deadline: Deadline, rec: Recorder) -> dict[str, Any]:
    """One part under its planned share of the time left."""
    done = rec.results["parts"].get(name)
    if done is not None:  # profile / host syncs made by the step part
        return done
    if deadline.left() < (MIN_S[name] if sizes.gpu else 0.0):
        return {"status": "skipped", "reason": f"out of time budget ({deadline.left():.0f} s left)"}
    todo = [n for n in PARTS if n in rec.selected and n not in rec.results["parts"]]
    share = Deadline(deadline.left() * PLAN_S[name] / sum(PLAN_S[n] for n in todo))
    t0 = time.monotonic()
    runners: dict[str, Callable[[], dict]] = {
        "layers": lambda: part_layers(sizes, share),
        "vit": lambda: part_vit(sizes, share),
        "fp8": lambda: part_fp8(sizes, share),
        "step": lambda: part_step(sizes, share, rec),
        "switches": lambda: part_switches(sizes, share, rec),
        "profile": lambda: part_syncs_and_profile(sizes, share, "profile"),
        "host_syncs": lambda: part_syncs_and_profile(sizes, share, "host_syncs"),
    }
    out = guarded(runners[name])
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


def _free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_all(sizes: Sizes, budget_s: float, parts: list[str], out: Path) -> dict:
    from megatron_navil.config.parallel import ParallelConfig
    from megatron_navil.training.flops import CONVENTION
    from megatron_navil.utils.distributed import destroy, initialize_model_parallel

    deadline = Deadline(budget_s)
    t0 = time.monotonic()
    results: dict[str, Any] = {
        "dry_run": not sizes.gpu,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "budget_s": budget_s,
        "device": device_facts(),
        "sizes": dataclasses.asdict(sizes),
        "convention": CONVENTION,
        "targets": TARGETS,
        "parts": {},
    }
    rec = Recorder(results, out / RESULTS_NAME, parts)
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        # a process group of its own: never the MASTER_PORT it inherited (a parent holding a
        # store there, e.g. the test session, makes the bind fail with EADDRINUSE)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
    try:
        for name in PARTS:
            if name not in parts:
                rec.put(name, {"status": "skipped", "reason": "not selected (--parts)"})
                continue
            log.info("part %s (%.0f s left)", name, deadline.left())
            initialize_model_parallel(ParallelConfig(), seed=1234)  # a Trainer may have changed it
            record = run_part(name, sizes, deadline, rec)
            results["wall_s"] = round(time.monotonic() - t0, 2)
            rec.put(name, record)
            log.info("part %s: %s", name, record["status"])
    finally:
        destroy()
    results["wall_s"] = round(time.monotonic() - t0, 2)
    rec.save()
    return results


# ----------------------------------------------------------------------------- table
def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def table_lines(results: dict) -> list[str]:
    """The markdown table: one row per measurement, 'skipped'/'error' rows with the reason."""
    p = results["parts"]
    lines = ["| part | what | ms | TFLOP/s | ratio / MFU | note |", "|---|---|---|---|---|---|"]

    def add(part, what, ms="-", tf="-", r="-", note=""):
        cells = [str(c).replace("|", "/") for c in (part, what, ms, tf, r, note)]  # kernel names
        lines.append("| " + " | ".join(cells) + " |")

    def skipped(name):
        rec = p.get(name, {})
        if rec.get("status") in ("skipped", "error", "failed") and "rows" not in rec:
            add(name, rec.get("status", "?"), note=rec.get("reason", ""))
            return True
        return False

    if not skipped("layers"):
        for r in p["layers"]["rows"]:
            what = f"{r['flavor']} layer {r['visual_share']:.0%} visual (NaViL / dense)"
            add(
                "layers",
                what,
                f"{r['navil_ms']:.3f} / {r['dense_ms']:.3f}",
                f"{_f(r['navil_tflops'], '{:.3g}')} / {_f(r['dense_tflops'], '{:.3g}')}",
                _f(r["ratio"], "{:.3f}x"),
                f"target >= {TARGETS['layer_ratio']}",
            )
    if not skipped("fp8"):
        for k, r in p["fp8"]["rows"].items():
            if r.get("status") != "ok":
                add("fp8", k, note=f"skipped: {r.get('reason', '')}")
            else:
                add(
                    "fp8",
                    f"9B x{p['fp8']['layers']} layers {k}",
                    _f(r["ms"], "{:.2f}"),
                    _f(r["tflops"], "{:.3g}"),
                    _f(r.get("speedup"), "{:.2f}x"),
                    "" if k == "bf16" else f"target >= {TARGETS['fp8_speedup']}",
                )
    if not skipped("vit"):
        for r in p["vit"]["rows"]:
            add(
                "vit",
                f"{r['flavor']} ViT width {r['width']}, {r['images']} images",
                _f(r["ms"], "{:.2f}"),
                _f(r["tflops"], "{:.3g}"),
                "-",
                f"target >= {TARGETS['vit_tflops']:.0f} at width >= 1536",
            )
    if not skipped("step"):
        for r in p["step"]["rows"]:
            depth = "x".join(map(str, r["depth"]))
            if r.get("status") != "ok":
                add(
                    "step",
                    f"{r['run']} depth {depth}",
                    note=f"{r.get('status')}: {r.get('reason', '')}",
                )
                continue
            note = f"peak {_f(r['peak_mem_gib'])} GiB"
            if r.get("peak_mem_gib_dp8_estimate") is not None:
                note += f" (8-GPU node est. {r['peak_mem_gib_dp8_estimate']:.1f})"
            if r.get("ms_full_depth_estimate"):
                note += f"; {r['note']}; full depth est. {r['ms_full_depth_estimate']:.0f} ms"
            add(
                "step",
                f"{r['run']} depth {depth} (LLM x ViT)",
                _f(r["ms"]),
                _f(r["tflops"], "{:.3g}"),
                _f(r["mfu"] * 100, "MFU {:.1f}%"),
                note,
            )
    for name in ("host_syncs", "profile"):
        rec = p.get(name, {})
        if rec.get("status") != "ok":
            add(name, rec.get("status", "?"), note=rec.get("reason", ""))
        elif name == "host_syncs":
            add(
                name,
                "per micro-batch",
                note=f"{rec['syncs_per_micro_batch']} syncs, "
                f"{rec['h2d_per_micro_batch']} pageable H2D"
                + (
                    f" (without pack metadata: {rec['syncs_without_pack_meta']} syncs, "
                    f"{rec['h2d_without_pack_meta']} H2D)"
                    if "syncs_without_pack_meta" in rec
                    else ""
                ),
            )
        else:
            for e in rec["top"][:15]:
                add(
                    name,
                    e["name"][:60],
                    _f(e["ms"], "{:.2f}"),
                    "-",
                    _f(e["share"] * 100, "{:.1f}%"),
                    rec["clock"],
                )
    if not skipped("switches"):
        for r in p["switches"]["rows"]:
            if r.get("status") != "ok":
                add(
                    "switches",
                    r["label"],
                    note=f"{r['status']}: {switch_reason(r)}"[:160],
                )
            else:
                add(
                    "switches",
                    f"{r['label']} on / off",
                    f"{r['on_ms']:.1f} / {r['off_ms']:.1f}",
                    "-",
                    _f(r["speedup"], "{:.3f}x"),
                    r["path"],
                )
    return lines


def switch_reason(row: dict) -> str:
    return row.get("reason") or row.get("on_error") or row.get("off_error") or ""


def format_table(results: dict) -> str:
    d = results["device"]
    head = (
        f"## bench_step ({'dry run, CPU' if results['dry_run'] else d['device']}; "
        f"torch {d['torch']}, mcore {d.get('megatron.core')}, TE {d.get('transformer_engine')}; "
        f"{results.get('wall_s', 0):.0f} s)"
    )
    return "\n".join([head, "", *table_lines(results)])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, debug flavors, fp32, local backend")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    p.add_argument("--budget", type=float, default=220.0, help="seconds for everything")
    p.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS)
    )
    a = p.parse_args(argv)
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {unknown}")
    gpu = torch.cuda.is_available() and not a.dry_run
    if not gpu and not a.dry_run:
        log.warning("no CUDA device: running the dry run")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(GPU_SIZES if gpu else DRY_SIZES, a.budget, parts, out)
    print(format_table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
