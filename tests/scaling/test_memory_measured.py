"""The memory model against memory measured on CPU, for the debug family widened so that the
model, not the Python process, dominates.

1. Activations: autograd's saved tensors of a real forward (saved_tensors_hooks, every storage
   counted once, parameters excluded) equal the model's activation bytes for that very batch
   (`MicroBatch.from_batch`) within 5%: the local backend's coefficients were measured this
   way, so a changed layer (a new saved tensor, a dropped one) shows here first.
2. Whole runs (processes, slow): navil-pretrain at 1 process, TP=2 (+SP) and PP=2 on mock data;
   each rank's peak resident memory (VmHWM, polled) minus the resident memory of the same
   command with the tiny debug model (everything the model is not: Python, torch, Megatron,
   gloo, the loader, thread pools) against the predicted peak of that rank's stage for the
   packs the run executes (at PP = 1 with their padding trimmed, as forward_step does)
   (parameters + gradients + optimizer + in-flight activations + one layer of backward working
   memory), and rank 0's resident memory between steps against the static part alone. glibc
   is told to return freed tensors at once (MALLOC_MMAP_THRESHOLD_), so resident memory follows
   the live tensors. Tolerances: static 10% + 16 MiB (allocator bookkeeping, DDP bucket
   padding); peak 15% + 32 MiB (how much of the last layer's activations autograd still holds
   while it makes their gradients varies; torch's single-tensor Adam makes temporaries per
   parameter; the baseline's thread pools and caches differ a little with the layout). Missing
   any one term of the model (the optimizer state is half the static bytes here, activations
   ~45% of the peak) falls far outside them.
On failure look at megatron_navil/scaling/memory.py (COEFFICIENTS, stage_memory).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from megatron_navil.config.flavors import get_flavor
from megatron_navil.config.parallel import ParallelConfig, PrecisionConfig
from megatron_navil.scaling.memory import MicroBatch, stage_memory
from megatron_navil.scaling.spec import WorkloadSpec

WIDE = {  # the debug family, wide enough that the model's bytes dominate
    "llm.hidden_size": 384,
    "llm.ffn_hidden_size": 1024,
    "llm.num_attention_heads": 6,
    "llm.kv_channels": 64,
    "vision.hidden_size": 128,
    "vision.ffn_hidden_size": 512,
}
W = WorkloadSpec(dtype="float32", backend="local")


def _saved_bytes(model, batch) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch.model_inputs())
    return sum(seen.values())


@pytest.mark.parametrize(
    "flavor,seq,extra",
    [
        ("debug-internlm2", 512, {}),
        ("debug-internlm2", 1024, {"llm.num_layers": 2}),
        ("debug-qwen3", 512, {"vision.num_layers": 4}),  # separate output mode, q/k norms
    ],
)
def test_activation_model_equals_autograds_saved_tensors(
    megatron_single_process, flavor, seq, extra
):
    from megatron_navil.models.navil import build_model
    from megatron_navil.training.data import MockPackLoader

    overrides = {k: v for k, v in WIDE.items() if not k.startswith("vision")}
    cfg = get_flavor(flavor).apply_overrides({**overrides, **extra}, parse=False)
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), PrecisionConfig(backend="local"))[0]
    batch = next(MockPackLoader(cfg, seq, 0, 0, 1))
    measured = _saved_bytes(model, batch)
    sm = stage_memory(
        cfg, ParallelConfig(), W, 1, 0, 1, 1, False, MicroBatch.from_batch(cfg, batch)
    )
    assert sm.activations_no_recompute == pytest.approx(measured, rel=0.05), (
        sm.activations_no_recompute / 2**20,
        measured / 2**20,
    )


# ---------------------------------------------------------------- whole runs (RSS)
ARGS = [
    "--mock-data",
    "--model",
    "debug-internlm2",
    "--seq-length",
    "1024",
    "--global-batch-size",
    "2",
    "--train-iters",
    "4",
    "--lr",
    "1e-4",
    "logging.progress_bar=off",
]
MIB = 2**20


def _run(world: int, args: list[str], metrics: Path) -> tuple[list[int], int]:
    """(each rank's peak resident bytes over the run (VmHWM, polled until exit), rank 0's
    resident bytes at the end of the last step (its metrics' mem_gb))."""
    from tests.launcher import start_ranks

    procs = start_ranks(
        "megatron_navil.cli.pretrain", world, args + ["--metrics-file", str(metrics)]
    )
    peaks = [0] * world
    deadline = time.time() + 600
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        for i, p in enumerate(procs):
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks[i] = max(peaks[i], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                pass
        time.sleep(0.05)
    outs = [p.communicate(timeout=60)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    last = json.loads(metrics.read_text().splitlines()[-1])
    return peaks, int(last["mem_gb"] * 2**30)


def _predicted(cfg, tp: int, pp: int, stage: int):
    """The model's StageMemory for the largest mock pack of the run."""
    from megatron_navil.config.training import TrainingConfig
    from megatron_navil.training.data import MockPackLoader
    from megatron_navil.training.step import padding_trim_multiple

    par = ParallelConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=tp > 1
    )
    loader = MockPackLoader(cfg, 1024, 1234, 0, 1)
    # what the run's forward_step executes: at PP = 1 the padding is trimmed (training.
    # trim_padding, on by default), so the activations are those of the trimmed pack
    trim = padding_trim_multiple(TrainingConfig(), par, PrecisionConfig(backend="local"))
    batches = [next(loader) for _ in range(8)]
    if trim is not None:
        batches = [b.trim_padding(trim) for b in batches]
    mbs = [MicroBatch.from_batch(cfg, b) for b in batches]
    return max(
        (stage_memory(cfg, par, W, 1, stage, 1, 2, False, mb) for mb in mbs), key=lambda m: m.total
    )


@pytest.mark.processes
@pytest.mark.slow
def test_resident_memory_of_real_runs_matches_the_model(tmp_path, monkeypatch):
    # NOTE: glibc keeps freed heap memory for reuse (allocations below its dynamic mmap
    # threshold, up to 32 MiB), so resident memory would count dead activations of earlier
    # steps. A fixed 64 KiB threshold puts every tensor in its own mapping, returned at free:
    # resident memory then follows the live tensors, which is what the model predicts.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    tiny = get_flavor("debug-internlm2")
    wide = tiny.apply_overrides(WIDE, parse=False)
    overrides = [f"model.{k}={v}" for k, v in WIDE.items()]
    _, tiny_end = _run(1, ARGS, tmp_path / "tiny.jsonl")
    base = tiny_end - _predicted(tiny, 1, 1, 0).static  # everything that is not the model
    report = {}
    for name, world, tp, pp, flags in [
        ("1 process", 1, 1, 1, []),
        ("TP=2 + SP", 2, 2, 1, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        ("PP=2", 2, 1, 2, ["--pipeline-model-parallel-size", "2"]),
    ]:
        peaks, end = _run(world, ARGS + flags + overrides, tmp_path / f"{world}{tp}{pp}.jsonl")
        # Between steps rank 0 holds exactly the static state: parameters, gradient buffer and
        # optimizer moments.
        want = _predicted(wide, tp, pp, 0)
        report[f"{name} static"] = (round((end - base) / MIB), round(want.static / MIB))
        assert abs(end - base - want.static) <= 0.10 * want.static + 16 * MIB, report
        for rank, peak in enumerate(peaks):
            want = _predicted(wide, tp, pp, rank if pp > 1 else 0)
            report[f"{name} rank {rank} peak"] = (
                round((peak - base) / MIB),
                round(want.total / MIB),
            )
            assert abs(peak - base - want.total) <= 0.15 * want.total + 32 * MIB, report
    print("measured vs model, MiB:", json.dumps(report))  # shown with -s; docs/scaling.md
