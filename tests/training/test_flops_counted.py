"""The MFU numerator (training/flops.py) equals an independent count: torch's FlopCounterMode
over the plain-PyTorch reference model (megatron_navil/reference/), forward and forward+backward,
with frozen parts, a padded pack, both output-projection modes and windowed ViT attention.

How the brute-force side is made independent of our formulas:
- the reference model has its own parameter names, window order and routing; which parts train
  is set with requires_grad from those names (`part_of`), and autograd alone decides which
  gradient GEMMs run (mm/bmm backward computes only the inputs that need a gradient);
- padding is not model work, so the reference runs on the pack with its padding segment cut
  off, while our count gets the padded pack;
- the reference's attention materialises the whole masked [T, T] score matrix, which is what a
  kernel may compute but not model work, so it is swapped for `exact_attention`: the same
  function (asserted equal) that multiplies only the allowed query-key pairs, each segment on
  its own and causal rows one by one, so the counter sees exactly the pairs the model needs;
- the LM head runs on the rows that take loss only, as the Megatron model does.
FlopCounterMode counts mm/addmm/bmm/convolution (and their backward) at 2 FLOPs per
multiply-add and nothing else, the same scope as our convention (norms, softmax, RoPE and
embedding lookups are uncounted on both sides). Both sides are integer counts well below 2^53,
so the tolerance is float64 round-off (rel 1e-12): any rule error (padding counted, a frozen
wgrad counted, a window counted as the whole image) is off by far more.
The Megatron model itself (local backend, CPU) is checked too, for its weight GEMMs: it runs
the padding through every layer and computes masked full squares in attention (kernel work, not
model work), so its mm/addmm FLOPs must equal our count with `include_padding=True` and the
attention pairs left out, forward and backward: Megatron's linears skip the same gradient GEMMs
our rule skips. With the fused chunked LM head (models/head_loss.py) backward counts exactly
one more head forward GEMM (its logits recompute, left out of model FLOPs like any recompute).
Where to look on failure: which assert (forward or backward) and which `trained` set; the
rules are in training/flop_rules.py, the op lists in training/flops.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import megatron_navil.reference.llm as ref_llm
import megatron_navil.reference.vision as ref_vision
from megatron_navil.config.flavors import get_flavor
from megatron_navil.config.training import StageConfig
from megatron_navil.data.synthetic import synthetic_batch
from megatron_navil.reference import NaViLReference
from megatron_navil.reference.common import attention, segment_ids
from megatron_navil.training.flops import (
    ALL_PARTS,
    batch_counts,
    count_flops,
    lm_head_flops,
    micro_batch_count,
    trained_parts,
)

SEQ = 256
# An image sample with two scales, a text-only sample, a two-image sample; the grids are large
# enough for several 4x4-patch windows, edge windows included (6 and 10 are not multiples of 4).
SAMPLES = [[3, [(4, 4), (8, 12)], 5], [7], [2, [(6, 10)], 2, [(4, 2)], 3]]

TRAINED = {
    "full": ALL_PARTS,
    "stage1": trained_parts(StageConfig(preset="stage1")),  # text LLM frozen
    "frozen_vit_at_input": frozenset({"text", "visual_experts", "special_tokens"}),
    "only_visual_experts": frozenset({"visual_experts"}),
    "only_connector": frozenset({"connector"}),
    "only_vision": frozenset({"vision"}),
}


def windowed(name: str):
    """`name` with window attention in every ViT layer but the last (3 layers)."""
    cfg = get_flavor(name)
    vision = dataclasses.replace(
        cfg.vision, num_layers=3, window_size=64, fullatt_block_indexes=(2,)
    )  # 64 px = 4 patches = 2 merged tokens per window side
    return dataclasses.replace(cfg, vision=vision)


CONFIGS = {
    "internlm2-composed": lambda: get_flavor("debug-internlm2"),
    "qwen3-separate": lambda: get_flavor("debug-qwen3"),
    "qwen3-windowed": lambda: windowed("debug-qwen3"),
}


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny matrices: intra-op threads only add overhead on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def exact_attention(q, k, v, segments, causal):
    """The reference attention computing only the allowed query-key pairs (see the docstring).
    Explicit bmm, not einsum: einsum turns a 1-key product into a multiply the counter skips."""
    t, h, hd = q.shape
    # GQA: [T, G, hd] -> [T, H, hd]; then heads first: [T, H, hd] -> [H, T, hd]
    k = k.repeat_interleave(h // k.shape[1], dim=1).transpose(0, 1)
    v = v.repeat_interleave(h // v.shape[1], dim=1).transpose(0, 1)
    q = q.transpose(0, 1)
    out = []
    bounds = torch.nonzero(torch.diff(segments.cpu(), prepend=torch.tensor([-1]))).flatten()
    for start, end in zip(bounds.tolist(), bounds.tolist()[1:] + [t]):
        # bidirectional: the whole segment; causal: query i reads keys start..i only
        queries = (
            [(start, end, end)] if not causal else [(i, i + 1, i + 1) for i in range(start, end)]
        )
        for q0, q1, k1 in queries:
            scores = torch.bmm(q[:, q0:q1], k[:, start:k1].transpose(1, 2)) / hd**0.5
            out.append(torch.bmm(scores.softmax(-1), v[:, start:k1]))  # [H, q, hd]
    return torch.cat(out, dim=1).transpose(0, 1)  # [H, T, hd] -> [T, H, hd]


def part_of(name: str) -> str:
    """Stage part of a reference (HF-layout) parameter, from the release's names alone."""
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("mlp1."):
        return "connector"
    if name.startswith("special_token_embedding"):
        return "special_tokens"
    return "visual_experts" if "_ve." in name else "text"


def reference(cfg) -> NaViLReference:
    torch.manual_seed(0)
    return NaViLReference(cfg).init_weights_(torch.Generator().manual_seed(0)).double()


def counted_flops(model, cfg, batch, trained: frozenset, backward: bool) -> float:
    """FlopCounterMode's count of the reference on the pack without its padding segment."""
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name) in trained)
    pad = batch.metadata["padding_tokens"]
    real = batch.num_tokens - pad
    assert int(batch.cu_seqlens[-1] - batch.cu_seqlens[-2]) == pad  # padding: the last segment
    ids, pos = batch.tokens[:real], batch.position_ids[:real]
    rows = ((batch.loss_mask[:real] != 0) & (ids != cfg.img_context_id)).nonzero().flatten()
    pixels = batch.pixel_values.double()
    with FlopCounterMode(display=False) as counter:
        x = model.embed(ids, pixels, batch.grid_thw)
        segments = segment_ids(batch.cu_seqlens[:-1], real)
        h = model.language_model.model.run(x, model.visual_mask(ids), pos, segments)
        logits = model.language_model.head(h[rows])
        if backward:
            logits.square().mean().backward()
    return float(counter.get_total_flops())


@pytest.fixture
def exact(monkeypatch):
    monkeypatch.setattr(ref_llm, "attention", exact_attention)
    monkeypatch.setattr(ref_vision, "attention", exact_attention)


@pytest.mark.parametrize("causal", [True, False])
def test_exact_attention_is_the_reference_attention(causal):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(11, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: 2 key/value heads
    segments = torch.tensor([0] * 4 + [1] * 6 + [2])
    torch.testing.assert_close(
        exact_attention(q, k, v, segments, causal), attention(q, k, v, segments, causal)
    )


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_forward_matches_flop_counter(config, exact):
    cfg = CONFIGS[config]()
    batch = synthetic_batch(cfg, SEQ, torch.Generator().manual_seed(0), SAMPLES)
    assert batch.metadata["padding_tokens"] > 0  # the pack is padded: padding must not count
    counted = counted_flops(reference(cfg), cfg, batch, ALL_PARTS, backward=False)
    ours = micro_batch_count(cfg, batch, ALL_PARTS)
    assert ours.forward == pytest.approx(counted, rel=1e-12)
    padded = micro_batch_count(cfg, batch, ALL_PARTS, include_padding=True)
    assert padded.forward > counted  # the hardware count is a different number


@pytest.mark.parametrize("trained", sorted(TRAINED))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_forward_backward_matches_flop_counter(config, trained, exact):
    cfg = CONFIGS[config]()
    batch = synthetic_batch(cfg, SEQ, torch.Generator().manual_seed(0), SAMPLES)
    model = reference(cfg)
    counted = counted_flops(model, cfg, batch, TRAINED[trained], backward=True)
    assert micro_batch_count(cfg, batch, TRAINED[trained]).total == pytest.approx(
        counted, rel=1e-12
    )


WEIGHT_OPS, ATTENTION_OPS = {"aten.mm", "aten.addmm"}, {"aten.bmm"}


def _by_kind(counter: FlopCounterMode) -> tuple[float, float]:
    """(weight GEMM, attention) FLOPs of a counter; an unknown op kind fails loudly."""
    ops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert set(ops) <= WEIGHT_OPS | ATTENTION_OPS, f"new op kinds {set(ops)}: classify them"
    return float(sum(ops.get(k, 0) for k in WEIGHT_OPS)), float(ops.get("aten.bmm", 0))


@pytest.mark.parametrize(
    "stage",
    [
        StageConfig(),
        StageConfig(preset="stage1"),
        StageConfig(train_vision=False, train_connector=False),
    ],
    ids=["full", "stage1", "frozen_vit_at_input"],
)
def test_megatron_model_weight_gemms_match_the_padded_count(megatron_single_process, stage):
    from megatron_navil.config import ParallelConfig, PrecisionConfig
    from megatron_navil.models.navil import NaViLModel
    from megatron_navil.training.stages import apply_stage, experts_trainable

    cfg = get_flavor("debug-qwen3")
    batch = synthetic_batch(cfg, SEQ, torch.Generator().manual_seed(0), SAMPLES)
    # the plain LM head (its GEMMs are Megatron's linear); the fused chunked head is checked
    # below: it recomputes its logits GEMM in backward, work the convention leaves out
    model = NaViLModel(
        cfg,
        ParallelConfig(),
        PrecisionConfig(lm_head_loss_chunk_rows=0),
        experts_trainable=experts_trainable(stage),
    )
    apply_stage([model], stage)
    with FlopCounterMode(display=False) as forward:
        per_position = model(**batch.model_inputs())
    with FlopCounterMode(display=False) as backward:
        per_position.sum().backward()
    no_pairs = dataclasses.replace(
        batch_counts(cfg, batch, include_padding=True),
        causal_pairs=0.0,
        full_pairs=0.0,
        window_pairs=0.0,
    )
    ours = count_flops(cfg, no_pairs, trained_parts(stage))
    assert _by_kind(forward)[0] == pytest.approx(ours.forward, rel=1e-12)
    assert _by_kind(backward)[0] == pytest.approx(ours.backward, rel=1e-12)
    model.language_model.head_loss_chunk = 7  # the fused head, in chunks
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fused_forward:
        per_position = model(**batch.model_inputs())
    with FlopCounterMode(display=False) as fused_backward:
        per_position.sum().backward()
    recompute = lm_head_flops(cfg, no_pairs.counted)  # the head's forward GEMM, once more
    assert _by_kind(fused_forward)[0] == pytest.approx(ours.forward, rel=1e-12)
    assert _by_kind(fused_backward)[0] == pytest.approx(ours.backward + recompute, rel=1e-12)
