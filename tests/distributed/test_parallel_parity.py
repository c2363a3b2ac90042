"""TP, PP, EP, SP, DP and their combinations reproduce the single-process training step.

A 1-process run of the debug model saves its weights and, after one step of two micro-batches
(images of several sizes and scales, text-only samples, packing), its gradients as Megatron
dist checkpoints. Each parallel layout is a real multi-process gloo job that loads those weights
resharded by dist_checkpointing, runs the same step through Megatron's pipeline schedule and
DDP, loads the reference gradients resharded the same way and compares every local shard.
The reference runs the plain LM head + cross entropy; every parallel run uses the fused, chunked one
(models/head_loss.py: one chunk, or 5-row chunks in the `_head_chunk5` layouts), so they also prove
that switch under TP and SP. The `_pack_meta` layouts give the parallel run's batches the loader's
host-side metadata (data.host_pack_metadata, megatron_navil/pack_meta.py) while the reference
computes it in the model, so they also prove the switch changes nothing under TP, SP and PP, and
that no call of anything would block the host on a GPU there per micro-batch (utils/host_syncs.py,
counted on every rank; Megatron's one check per step in finalize_model_grads is what remains).

Tolerance: losses to 1e-5 relative and gradients to 1e-4 of each tensor's largest entry. All
runs are fp32 on CPU with dropout 0; the only differences come from the order of floating-point
sums (TP all-reduces, reduce-scatters, split GEMMs): observed <= 1e-6 relative. A wrong
collective or a missing gradient reduction gives O(1) relative errors.
Where to look on failure: models/modality.py (comm), models/moe.py (EP), training/step.py.
"""

import glob
import json

import pytest

from tests.launcher import launch

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "tp2": (2, ["--tp", "2"]),
    "tp2_sp": (2, ["--tp", "2", "--sp"]),
    "pp2": (2, ["--pp", "2"]),
    "ep2": (2, ["--ep", "2"]),
    "dp2": (2, []),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"]),
    "tp2_ep2_sp": (4, ["--tp", "2", "--ep", "2", "--sp"]),
    "pp2_vpp2_interleaved": (2, ["--pp", "2", "--vpp", "2"]),
    "pp2_recompute_full": (2, ["--pp", "2", "--recompute", "full"]),
    "tp2_recompute_selective": (2, ["--tp", "2", "--recompute", "selective"]),
    # data.host_pack_metadata: the model takes the loader's host ints / indices instead of
    # computing them (the single-process reference computes them itself)
    "tp2_sp_pack_meta": (2, ["--tp", "2", "--sp", "--pack-meta"]),
    "tp2_pp2_pack_meta": (4, ["--tp", "2", "--pp", "2", "--pack-meta"]),
    # precision.lm_head_loss_chunk_rows: the fused head + loss in chunks of 5 rows (the others
    # run it in one chunk; the reference runs the plain path, chunk 0)
    "tp2_head_chunk5": (2, ["--tp", "2", "--head-chunk", "5"]),
    "tp2_sp_head_chunk5": (2, ["--tp", "2", "--sp", "--head-chunk", "5"]),
}
CASES = (
    [("debug-internlm2", name) for name in LAYOUTS]
    + [
        # Qwen3 adds per-head q/k norms per modality (replicated over TP, summed by finalize).
        ("debug-qwen3", name)
        for name in ("tp2_sp", "pp2", "ep2")
    ]
    + [
        # ...and with the encoder's full-width q/k norms (TP-sharded: finalize must NOT sum them,
        # which its name rule for the LLM's norms once did).
        ("debug-qwen3+vit_qk_norm", "tp2"),
    ]
)
# Named model variants: flavor + dotted overrides passed to the worker.
VARIANTS = {"debug-qwen3+vit_qk_norm": ("debug-qwen3", ["vision.qk_normalization=true"])}


def _model_args(variant: str) -> list[str]:
    flavor, overrides = VARIANTS.get(variant, (variant, []))
    return ["--flavor", flavor] + [a for o in overrides for a in ("--override", o)]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """flavor -> (dir, reference result), computed once per flavor."""
    cache = {}

    def get(flavor):
        if flavor not in cache:
            d = tmp_path_factory.mktemp(flavor)
            launch(
                "tests.workers.parity",
                1,
                [
                    "--mode",
                    "reference",
                    "--head-chunk",
                    "0",
                    *_model_args(flavor),
                    "--dir",
                    str(d),
                    "--out",
                    str(d / "ref"),
                ],
            )
            with open(d / "ref.rank0.json") as f:
                ref = json.load(f)
            assert len(ref["losses"]) == 4 and all(x > 1.0 for x in ref["losses"])
            cache[flavor] = (d, ref)
        return cache[flavor]

    return get


@pytest.mark.parametrize("flavor, name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_layout_matches_single_process(references, flavor, name):
    d, ref = references(flavor)
    world, args = LAYOUTS[name]
    out = d / name
    launch(
        "tests.workers.parity",
        world,
        ["--mode", "parallel", *_model_args(flavor), "--dir", str(d), "--out", str(out), *args],
    )
    ranks = [json.load(open(f)) for f in sorted(glob.glob(f"{out}.rank*.json"))]
    assert len(ranks) == world
    # Every micro-batch's loss appears on some last-stage rank and equals the reference.
    seen = [x for r in ranks for x in r["losses"]]
    assert seen, "no rank reported losses"
    for loss in seen:
        assert min(abs(loss - x) / x for x in ref["losses"]) < 1e-5, (loss, ref["losses"])
    if name == "dp2":
        assert sorted(seen) == pytest.approx(sorted(ref["losses"]), rel=1e-6)
    if "sp" in name.split("_"):
        assert all(r["sequence_parallel"] for r in ranks)
    nonzero = 0
    for r in ranks:
        for param, (diff, scale) in r["grad_diff"].items():
            assert diff <= 1e-4 * max(scale, 1e-8), (
                f"rank {r['rank']} {param}: |dg| {diff} vs {scale}"
            )
            nonzero += scale > 0
    assert nonzero > 10, "gradients were all zero: the comparison would prove nothing"
    if name.endswith("_pack_meta"):
        # with the metadata nothing blocks the host per micro-batch on any rank; what remains
        # is Megatron's one check per step in finalize_model_grads (num_tokens > 0)
        for r in ranks:
            per_step = {s: n for s, n in r["host_syncs"].items() if "finalize_model_grads" in s}
            assert r["host_syncs"] == per_step and sum(per_step.values()) <= 1, r["host_syncs"]
