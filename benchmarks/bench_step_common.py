"""Shared pieces of the step benchmark (bench_step.py): sizes of the GPU run and of the CPU dry
run, the time budget, timing with warm-up (CUDA events on a GPU), realistic packs and facts
about the device."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_navil.utils.logging import get_logger  # noqa: E402

log = get_logger("bench_step")

VISUAL_SHARES = (0.3, 0.6)
TARGETS = {"layer_ratio": 0.97, "fp8_speedup": 1.2, "vit_tflops": 400.0, "step_mfu": 0.5}
FLAVORS = ("navil-2b", "navil-9b")
# The dry run's stand-ins: the same backbone layouts (composed vs separate output projection,
# q/k norms) at debug widths.
DRY_FLAVORS = {"navil-2b": "debug-internlm2", "navil-9b": "debug-qwen3"}


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


# ----------------------------------------------------------------------------- recording
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
