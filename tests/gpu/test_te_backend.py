"""Transformer Engine backend on a GPU: agrees with the local backend, FP8 runs for any pack.

1. Parity in bf16 (both backbones x both output-projection modes): weights move from a
   local-backend model to a TE model through a dist checkpoint (which must load although it has
   no TE `_extra_state`); logits, loss and every parameter's gradient (moved back the same way,
   so the TE layout's names never matter) agree. Tolerance: bf16 keeps 8 mantissa bits and the
   backends use different kernels (cuDNN fused THD attention, TE GEMMs and norms), so logits
   within 5e-2 absolute, the loss within 2e-2 relative, and each gradient within 5e-2 of its own
   norm (||g_te - g_local|| <= 0.05 ||g_local||); a wrong layout or routing is O(1).
2. A text-only pack and an image-heavy pack, bf16 and FP8 (delayed, tensorwise): forward and
   backward run (no kernel on zero rows), loss and gradients finite, the absent modality's expert
   weights get exactly zero gradient; bf16 also matches the local backend as in 1; FP8 stays
   within 10% of the bf16 loss of the same weights (E4M3/E5M2 quantisation of a random model).
3. FP8 with per-modality row counts that are NOT multiples of 16 (13 visual tokens, odd text).
4. A TE checkpoint round trip (bf16, and FP8 delayed with its scaling state) gives bit-identical
   logits in the reloaded model.
5. Full activation recompute under FP8 (TE's checkpoint, replaying the same scales) gives the
   loss and gradients of the run without recompute (1e-3 relative loss, 2e-2 of each
   gradient's norm: identical maths, recompute only repeats the forward).
6. Through the real trainer (mock data, `precision.backend=transformer_engine`): stage 1 with
   overlapped grad reduce leaves every text weight bit-identical and changes the visual expert
   (it got gradients: TE's grouped GEMM would have skipped them); the debug model's FP8 loss
   curves (delayed, tensorwise) stay within 5% of the bf16 curve at every one of 30 steps
   from the same start, and fall.
Skipped without CUDA + Transformer Engine (the CI machine); run on the GPU test machine
(benchmarks/gpu_check.sh runs this file).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from megatron_navil.models.backends import te_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not te_available(), reason="needs CUDA and Transformer Engine"),
]

FLAVORS = [
    ("debug-internlm2", "composed"),
    ("debug-internlm2", "separate"),
    ("debug-qwen3", "separate"),
    ("debug-qwen3", "composed"),
]
PACKS = {
    "mixed": [[5, [(2, 4), (4, 6)], 11], [13], [3, [(6, 4)], 7]],
    "text_only": [[60], [33, 21]],
    "image_heavy": [[1, [(16, 16)], 1], [1, [(8, 12), (16, 24)], 1]],
}


@pytest.fixture(scope="module")
def gpu_parallel_state():
    from megatron_navil.config import ParallelConfig
    from megatron_navil.utils import distributed

    os.environ.setdefault("MASTER_PORT", "29561")
    os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = "0", "1", "0"
    distributed.initialize_model_parallel(ParallelConfig(), seed=1)
    yield
    distributed.destroy()


def _cfg(flavor, proj="composed"):
    from megatron_navil.config import get_flavor

    return get_flavor(flavor).apply_overrides({"experts.output_proj_mode": proj})


def _batch(cfg, pack="mixed", seq=512, seed=0):
    from megatron_navil.data.synthetic import synthetic_batch

    g = torch.Generator().manual_seed(seed)
    return synthetic_batch(cfg, seq, g, PACKS[pack]).to("cuda")


def _build(cfg, backend, fp8=None, recompute=None, seed=0):
    from megatron_navil.config import ParallelConfig, PrecisionConfig
    from megatron_navil.models.navil import NaViLModel

    torch.manual_seed(seed)
    precision = PrecisionConfig(backend=backend, params_dtype="bfloat16", fp8=fp8)
    model = NaViLModel(cfg, ParallelConfig(recompute_granularity=recompute), precision).cuda()
    return model.train()


def _move(src, dst, tmp_path, name):
    """src's parameters into dst through a dist checkpoint (backend- and layout-free keys)."""
    from megatron_navil import checkpoint as ck

    ck.save(tmp_path / name, 1, ck.model_sharded_state_dict([src]), src.cfg)
    ck.load_model(tmp_path / name, [dst], dst.cfg)


def _grads_as_params(model, like, tmp_path, name):
    """`model`'s gradients laid out as the parameters of `like` (another backend), by name."""
    with torch.no_grad():
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
        _move(model, like, tmp_path, name)
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return {n: p.detach().float().clone() for n, p in like.named_parameters()}


@torch.no_grad()
def _logits(model, b):
    """(logits [n, vocab], rows) of an inference forward (no labels)."""
    return model(
        b.tokens, b.position_ids, b.cu_seqlens, pixel_values=b.pixel_values, grid_thw=b.grid_thw
    )


def _loss(model, batch):
    return model(**batch.model_inputs()).sum() / batch.loss_mask.sum()


def _assert_grads_close(got: dict, want: dict, rel=5e-2):
    worst = []
    for n, w in want.items():
        g = got[n]
        denom = float(w.norm())
        if denom == 0:
            assert float(g.norm()) == 0, n
            continue
        err = float((g - w).norm()) / denom
        worst.append((err, n))
    worst.sort(reverse=True)
    assert worst and worst[0][0] <= rel, worst[:5]


@pytest.mark.parametrize("flavor, proj", FLAVORS, ids=[f"{f}-{p}" for f, p in FLAVORS])
def test_te_matches_local_bf16(gpu_parallel_state, tmp_path, flavor, proj):
    cfg = _cfg(flavor, proj)
    local, te = _build(cfg, "local"), _build(cfg, "transformer_engine", seed=1)
    _move(local, te, tmp_path, "w")  # a local checkpoint (no _extra_state) into TE modules
    b = _batch(cfg)
    (lo, rows), (to, rows2) = _logits(local, b), _logits(te, b)
    assert torch.equal(rows, rows2)
    v = cfg.llm.vocab_size
    torch.testing.assert_close(to[:, :v].float(), lo[:, :v].float(), atol=5e-2, rtol=0)
    loss_l, loss_t = _loss(local, b), _loss(te, b)
    assert abs(loss_t.item() - loss_l.item()) <= 2e-2 * abs(loss_l.item())
    loss_l.backward()
    loss_t.backward()
    holder = _build(cfg, "transformer_engine", seed=2)
    want = _grads_as_params(local, holder, tmp_path, "g")
    got = {
        n: p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        for n, p in te.named_parameters()
    }
    _assert_grads_close(got, want)


def _expert_weights(model, modality: int):
    """Parameters of the text (0) or visual (1) FFN expert and attention expert linears."""
    from megatron_navil.models.modality import TEXT, VISUAL

    tag = {TEXT: ".text.", VISUAL: ".visual."}[modality]
    out = {}
    for n, p in model.named_parameters():
        m = re.search(r"experts\.(?:local_experts\.(\d+)\.|linear_fc\d\.weight(\d+))", n)
        if m and int(m.group(1) or m.group(2)) == modality:
            out[n] = p
        elif tag in n and "language_model" in n:
            out[n] = p
    return out


@pytest.mark.parametrize("pack", ["text_only", "image_heavy"])
@pytest.mark.parametrize("fp8", [None, "delayed", "tensorwise"])
def test_one_modality_packs(gpu_parallel_state, tmp_path, pack, fp8):
    from megatron_navil.models.modality import VISUAL

    cfg = _cfg("debug-qwen3", "separate")
    bf16 = _build(cfg, "transformer_engine")
    b = _batch(cfg, pack)
    ref = _loss(bf16, b)
    model = bf16 if fp8 is None else _build(cfg, "transformer_engine", fp8=fp8, seed=3)
    if fp8 is not None:
        _move(bf16, model, tmp_path, "w")
    loss = _loss(model, b)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if fp8 is None:
        local = _build(cfg, "local", seed=4)
        _move(bf16, local, tmp_path, "l")
        assert abs(_loss(local, b).item() - loss.item()) <= 2e-2 * abs(loss.item())
    else:
        assert abs(loss.item() - ref.item()) <= 0.1 * abs(ref.item()), (loss.item(), ref.item())
    if pack == "text_only":
        absent = _expert_weights(model, VISUAL)
        assert absent
        for n, p in absent.items():
            assert p.grad is not None and not p.grad.any(), n


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_forward_backward_odd_modality_splits(gpu_parallel_state, recipe):
    from megatron_navil.data.synthetic import synthetic_batch

    cfg = _cfg("debug-qwen3", "separate")
    model = _build(cfg, "transformer_engine", fp8=recipe)
    # 2x4 + 4x6 + 6x4 patch grids -> 2 + 6 + 6 = 14 <IMG_CONTEXT> tokens; odd text lengths
    samples = [[5, [(2, 4), (4, 6)], 11], [13], [3, [(6, 4)], 7]]
    b = synthetic_batch(cfg, 256, torch.Generator().manual_seed(1), samples).to("cuda")
    n_visual = int(((b.tokens == cfg.img_context_id) | (b.tokens == cfg.img_start_id)).sum())
    assert n_visual % 16 and (b.num_tokens - n_visual) % 16, "the test needs odd splits"
    loss = model(**b.model_inputs()).sum()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.float().abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("fp8", [None, "delayed"])
def test_te_checkpoint_round_trip(gpu_parallel_state, tmp_path, fp8):
    cfg = _cfg("debug-internlm2")
    model = _build(cfg, "transformer_engine", fp8=fp8)
    b = _batch(cfg)
    for _ in range(3):  # FP8: populate amax history and scales worth saving
        _loss(model, b).backward()
    fresh = _build(cfg, "transformer_engine", fp8=fp8, seed=9)
    _move(model, fresh, tmp_path, "rt")
    model.eval(), fresh.eval()
    assert torch.equal(_logits(model, b)[0], _logits(fresh, b)[0])


def test_full_recompute_under_fp8(gpu_parallel_state, tmp_path):
    cfg = _cfg("debug-internlm2")
    plain = _build(cfg, "transformer_engine", fp8="delayed")
    recomputed = _build(cfg, "transformer_engine", fp8="delayed", recompute="full", seed=5)
    _move(plain, recomputed, tmp_path, "w")
    b = _batch(cfg)
    lp, lr = _loss(plain, b), _loss(recomputed, b)
    lp.backward()
    lr.backward()
    assert abs(lp.item() - lr.item()) <= 1e-3 * abs(lp.item())
    want = {n: p.grad.float() for n, p in plain.named_parameters() if p.grad is not None}
    got = {n: p.grad.float() for n, p in recomputed.named_parameters() if p.grad is not None}
    assert want.keys() == got.keys()
    _assert_grads_close(got, want, rel=2e-2)


# ----------------------------------------------------------------------------- real trainer

TE_BASE = [
    "--mock-data",
    "--model",
    "debug-internlm2",
    "--seq-length",
    "512",
    "--global-batch-size",
    "2",
    "--lr",
    "1e-3",
    "--lr-warmup-iters",
    "0",
    "--bf16",
    "precision.backend=transformer_engine",
    "training.seed=7",
    "logging.progress_bar=off",
]


@pytest.fixture(scope="module")
def te_init(tmp_path_factory):
    """A 1-step TE checkpoint every trainer test starts from (--load ... --finetune)."""
    from tests.training.runner import pretrain

    d = tmp_path_factory.mktemp("te_init") / "ck"
    pretrain(1, TE_BASE + ["--train-iters", "1", "--save", str(d)])
    return d


def _checkpoint_weights(root, cfg):
    """A TE checkpoint's weights read through a local-backend bf16 model (local names)."""
    from megatron_navil import checkpoint as ck
    from megatron_navil.config import ParallelConfig, PrecisionConfig
    from megatron_navil.models.navil import NaViLModel

    model = NaViLModel(
        cfg, ParallelConfig(), PrecisionConfig(backend="local", params_dtype="bfloat16")
    )
    ck.load_model(root, [model], cfg)
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_stage1_on_te_trains_visual_and_freezes_text(gpu_parallel_state, te_init, tmp_path):
    from megatron_navil.config import get_flavor
    from megatron_navil.training.stages import classify
    from tests.training.runner import pretrain

    after = tmp_path / "after"
    pretrain(
        1,
        TE_BASE
        + [
            "--train-iters",
            "3",
            "--load",
            str(te_init),
            "--finetune",
            "--save",
            str(after),
            "stage.preset=stage1",
            "optimizer.overlap_grad_reduce=true",
        ],
    )
    cfg = get_flavor("debug-internlm2")
    model, w0 = _checkpoint_weights(te_init, cfg)
    _, w1 = _checkpoint_weights(after, cfg)
    parts = classify(model)
    changed = {p: False for p in set(parts.values())}
    for name, part in parts.items():
        same = torch.equal(w0[name], w1[name])
        if part == "text":
            assert same, f"frozen text weight {name} changed"
        changed[part] |= not same
    # the visual FFN expert trained (TE's grouped GEMM would have given it no gradient); the
    # last layer's visual FFN feeds only <IMG_CONTEXT> outputs, which take no loss
    visual_ffn = [n for n in parts if "local_experts.1." in n and ".layers.0." in n]
    assert visual_ffn and all(not torch.equal(w0[n], w1[n]) for n in visual_ffn)
    assert changed["vision"] and changed["visual_experts"] and changed["connector"]


def test_fp8_loss_curves_follow_bf16(te_init, tmp_path):
    from tests.training.runner import losses, pretrain

    curves = {}
    for recipe in (None, "delayed", "tensorwise"):
        m = tmp_path / f"{recipe}.jsonl"
        extra = [] if recipe is None else ["--fp8-recipe", recipe]
        pretrain(
            1,
            TE_BASE
            + [
                "--train-iters",
                "30",
                "--load",
                str(te_init),
                "--finetune",
                "--metrics-file",
                str(m),
            ]
            + extra,
        )
        curves[recipe] = losses(m)
    ref = curves[None]
    assert sorted(ref) == list(range(1, 31))
    for recipe in ("delayed", "tensorwise"):
        got = curves[recipe]
        for s in ref:
            assert abs(got[s] - ref[s]) <= 0.05 * ref[s], (recipe, s, got[s], ref[s])
        assert sum(got[s] for s in range(26, 31)) < sum(got[s] for s in range(1, 6)), recipe
