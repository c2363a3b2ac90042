"""The Transformer Engine path's decisions, proved on CPU (TE itself cannot run here).

Each test covers logic that once stopped the first GPU run (tests/gpu runs the real modules):
- TP flags: TE's Linear.reset_parameters already marks its weight (partition_dim 0); a shard
  linear must overwrite the flags (row shards are split along dim 1), which Megatron's own
  helper refuses to do.
- Frozen experts: TE's GroupedLinear computes every expert's weight gradient or none (from the
  first weight's requires_grad), so a stage that trains one FFN expert and freezes the other must
  get separate expert GEMMs; a model built otherwise is refused after freezing.
- FP8 safety for any mix of packs: amax is reduced over TP only, and the set AND order of
  modules that run (every module a TE FP8 GEMM or norm would sit in) is the same for a text-only,
  an image-heavy and a mixed pack (with the encoder running on every micro-batch when asked).
- Zero rows: an absent modality gets a block of zero rows, never 0 rows; its expert weights get
  gradients that are exactly zero (not None) and the present modality's outputs are unchanged;
  the EP dispatch path pads an expert that received no token the same way.
- Recipe padding and refusal: row multiples follow the recipe (MXFP8 32), a sequence length the
  recipe cannot pad to is refused, and recipes the device cannot run are refused by compute
  capability and CUDA version with a message naming what would run.
- `backend: auto` on a GPU without a working Transformer Engine says so in one line with the
  install command; an explicit TE backend without it is an error naming the cause.
Tolerances: exact (bit-identical) comparisons; all of this is integer or fp32 CPU logic.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
from megatron_navil.config.base import ConfigError
from megatron_navil.config.pretrain import PretrainConfig
from megatron_navil.config.training import StageConfig
from megatron_navil.data.synthetic import synthetic_batch
from megatron_navil.models import transformer_config
from megatron_navil.models.backends import (
    choose_backend,
    get_backend,
    te_import_error,
    use_grouped_experts,
)
from megatron_navil.models.fp8 import check_fp8_recipe
from megatron_navil.models.local_layers import ShardLinear, finish_shard_params
from megatron_navil.models.modality import ModalityRouting
from megatron_navil.models.moe import run_experts_nonempty
from megatron_navil.models.navil import NaViLModel
from megatron_navil.models.transformer_config import llm_transformer_config
from megatron_navil.training.stages import apply_stage, check_grouped_experts, experts_trainable

# ----------------------------------------------------------------------------- TP flags


def test_shard_flags_overwrite_what_te_reset_parameters_set():
    lin = torch.nn.Linear(8, 4, bias=False)
    # exactly what TE's Linear.reset_parameters leaves on a weight with parallel_mode=None
    set_tensor_model_parallel_attributes(lin.weight, True, 0, 1)
    with pytest.raises(AssertionError):  # the call that made every TE model fail to build
        set_tensor_model_parallel_attributes(lin.weight, True, 1, 1)
    finish_shard_params(lin, partition_dim=1)
    assert (
        lin.weight.tensor_model_parallel,
        lin.weight.partition_dim,
        lin.weight.partition_stride,
        lin.weight.allreduce,
    ) == (True, 1, 1, True)


@pytest.mark.parametrize("dim, bias", [(0, True), (1, False)])
def test_local_shard_linear_flags(megatron_single_process, dim, bias):
    cfg = llm_transformer_config(
        get_flavor("debug-qwen3"), ParallelConfig(), PrecisionConfig(), "local"
    )
    lin = ShardLinear(8, 4, config=cfg, init_method=cfg.init_method, bias=bias, partition_dim=dim)
    assert lin.weight.partition_dim == dim and lin.weight.tensor_model_parallel
    if bias:
        assert lin.bias.partition_dim == 0


# ----------------------------------------------------------------------------- frozen experts


def test_grouped_experts_only_when_both_experts_train_alike():
    assert use_grouped_experts("transformer_engine", (True, True))
    assert use_grouped_experts("transformer_engine", (False, False))
    assert not use_grouped_experts("transformer_engine", (False, True))  # stage 1
    assert not use_grouped_experts("transformer_engine", (True, False))
    assert not use_grouped_experts("local", (True, True))
    assert experts_trainable(StageConfig(preset="stage1")) == (False, True)
    assert experts_trainable(StageConfig(preset="full")) == (True, True)
    assert experts_trainable(StageConfig(train_visual_experts=False)) == (True, False)


def test_mixed_frozen_grouped_weights_are_refused():
    class Grouped(torch.nn.Module):  # parameters named like TE GroupedLinear's
        def __init__(self):
            super().__init__()
            self.weight0 = torch.nn.Parameter(torch.zeros(2, 2))
            self.weight1 = torch.nn.Parameter(torch.zeros(2, 2))

    chunk = torch.nn.ModuleDict({"fc1": Grouped()})
    check_grouped_experts([chunk])  # both train: fine
    chunk["fc1"].weight0.requires_grad_(False)
    with pytest.raises(ValueError, match="weight0=False, weight1=True"):
        check_grouped_experts([chunk])
    chunk["fc1"].weight1.requires_grad_(False)
    check_grouped_experts([chunk])  # both frozen: fine


def test_stage1_model_has_separate_trainable_visual_expert(megatron_single_process):
    cfg = get_flavor("debug-internlm2")
    model = NaViLModel(
        cfg,
        ParallelConfig(),
        PrecisionConfig(backend="local"),
        experts_trainable=experts_trainable(StageConfig(preset="stage1")),
    )
    apply_stage([model], StageConfig(preset="stage1"))
    experts = model.language_model.decoder.layers[0].mlp.experts
    assert not any(p.requires_grad for p in experts.local_experts[0].parameters())
    assert all(p.requires_grad for p in experts.local_experts[1].parameters())


# ----------------------------------------------------------------------------- FP8 across ranks


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_amax_is_reduced_over_tp_only(recipe):
    # The TransformerConfig fields both the LLM's and the encoder's config are built from
    # (building the config itself needs TE for its rope-fusion check).
    kw = transformer_config._common(
        ParallelConfig(), PrecisionConfig(fp8=recipe), "transformer_engine"
    )
    assert kw["fp8"] == "hybrid" and kw["fp8_recipe"].value == recipe and kw["tp_only_amax_red"]


PACKS = {
    "text_only": [[40], [21, 17]],
    "image_heavy": [[1, [(16, 16)], 1], [1, [(8, 12), (16, 24)], 1]],
    "mixed": [[3, [(2, 4), (4, 6)], 5], [7], [2, [(8, 4)], 2]],
}


def _module_trace(model, batch) -> list[str]:
    """Names of the modules holding parameters, in execution order, for one fwd+bwd; a call on
    zero rows (which a TE kernel would not survive) is marked."""
    trace, hooks = [], []

    def record(name, args):
        empty = bool(args) and isinstance(args[0], torch.Tensor) and args[0].shape[0] == 0
        trace.append(name + (" [0 rows]" if empty else ""))

    for name, m in model.named_modules():
        if next(m.parameters(recurse=False), None) is not None:
            hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: record(n, args)))
    try:
        model(**batch.model_inputs()).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return trace


@pytest.mark.parametrize("flavor", ["debug-internlm2", "debug-qwen3"])
def test_same_modules_run_for_every_pack_mix(megatron_single_process, flavor):
    cfg = get_flavor(flavor)
    torch.manual_seed(0)
    model = NaViLModel(
        cfg, ParallelConfig(), PrecisionConfig(backend="local"), vision_every_micro_batch=True
    )
    model.train()
    traces = {}
    for name, samples in PACKS.items():
        batch = synthetic_batch(cfg, 512, torch.Generator().manual_seed(1), samples)
        traces[name] = _module_trace(model, batch)
        # every trainable parameter got a gradient on this pack (DDP's overlapped reduce)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), name
        model.zero_grad(set_to_none=True)
    assert traces["text_only"] == traces["image_heavy"] == traces["mixed"]
    assert not any("[0 rows]" in n for n in traces["text_only"])
    assert any(n.startswith("vision_model.") for n in traces["text_only"])


def test_blank_image_adds_exactly_zero(megatron_single_process):
    cfg = get_flavor("debug-internlm2")
    torch.manual_seed(0)
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig(backend="local"))
    batch = synthetic_batch(cfg, 256, torch.Generator().manual_seed(2), PACKS["text_only"])
    model.train()
    plain = model(**batch.model_inputs())
    model.vision_every_micro_batch = True
    with_blank = model(**batch.model_inputs())
    assert torch.equal(plain, with_blank)
    with_blank.sum().backward()
    vision_grads = [p.grad for n, p in model.named_parameters() if n.startswith("vision_model.")]
    assert vision_grads and all(g is not None and not g.any() for g in vision_grads)


# ----------------------------------------------------------------------------- zero rows


@pytest.mark.parametrize("row_multiple", [1, 16, 32])
def test_absent_modality_gets_a_zero_row_block(row_multiple):
    mask = torch.zeros(37, dtype=torch.bool)  # text only
    r = ModalityRouting.build(mask, row_multiple=row_multiple)
    assert r.counts == (37, 0)
    assert r.padded == (-(-37 // row_multiple) * row_multiple, row_multiple)
    x = torch.randn(37, 8)
    grouped = r.group(x)
    assert grouped.shape[0] == sum(r.padded) and not grouped[r.padded[0] :].any()
    assert torch.equal(r.ungroup(grouped), x)
    r_all_visual = ModalityRouting.build(torch.ones(5, dtype=torch.bool), row_multiple=row_multiple)
    assert r_all_visual.padded == (row_multiple, -(-5 // row_multiple) * row_multiple)


def test_absent_expert_gets_exactly_zero_gradient():
    torch.manual_seed(0)
    text, visual = torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(8, 6, bias=False)
    x = torch.randn(20, 8)
    rows_seen = []

    def visual_fn(rows):
        rows_seen.append(rows.shape[0])
        return visual(rows)

    r = ModalityRouting.build(torch.zeros(20, dtype=torch.bool), row_multiple=16)
    y = r.apply(x, text, visual_fn)
    assert torch.equal(y, text(x))  # the present modality is untouched
    (y * torch.randn_like(y)).sum().backward()
    assert rows_seen == [16]
    assert visual.weight.grad is not None and not visual.weight.grad.any()
    assert text.weight.grad.abs().sum() > 0


def test_dispatch_path_pads_an_expert_without_tokens(megatron_single_process):
    cfg = get_flavor("debug-internlm2")
    torch.manual_seed(0)
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig(backend="local"))
    experts = model.language_model.decoder.layers[0].mlp.experts  # SequentialMLP of 2
    seen = []
    hook = experts.local_experts[1].register_forward_pre_hook(
        lambda m, a: seen.append(a[0].shape[0])
    )
    x = torch.randn(11, cfg.llm.hidden_size)
    probs = torch.ones(11)
    out, _ = run_experts_nonempty(experts, x, torch.tensor([11, 0]), probs, row_multiple=16)
    hook.remove()
    assert seen == [16] and out.shape == x.shape
    ref, _ = experts(x, torch.tensor([11, 0]), probs)
    assert torch.equal(out, ref)
    out.sum().backward()
    w = [p.grad for p in experts.local_experts[1].parameters()]
    assert w and all(g is not None and not g.any() for g in w)


# ----------------------------------------------------------------------------- recipes


def test_row_multiple_follows_the_recipe():
    assert PrecisionConfig().row_multiple() == 1
    for recipe in ("delayed", "tensorwise", "blockwise"):
        assert PrecisionConfig(backend="auto", fp8=recipe).row_multiple() == 16
    assert PrecisionConfig(fp8="mxfp8").row_multiple() == 32
    assert PrecisionConfig(fp8="delayed", fp8_padding_multiple=48).row_multiple() == 48
    with pytest.raises(ConfigError, match="needs a positive multiple of 32"):
        PrecisionConfig(fp8="mxfp8", fp8_padding_multiple=16).validate()
    assert get_backend("local", row_multiple=32).fp8_row_multiple == 32


def test_sequence_length_must_suit_the_recipe():
    def cfg(recipe, seq):
        c = PretrainConfig(mock_data=True)
        c.precision.fp8, c.precision.backend, c.training.seq_length = recipe, "auto", seq
        return c

    cfg("delayed", 48).validate()
    with pytest.raises(ConfigError, match="--seq-length 48 must be a multiple of 32"):
        cfg("mxfp8", 48).validate()
    cfg("mxfp8", 64).validate()


@pytest.mark.parametrize(
    "recipe, capability, cuda, ok",
    [
        ("delayed", (9, 0), "13.0", True),
        ("tensorwise", (9, 0), "12.4", True),
        ("delayed", (8, 9), "12.1", True),
        ("delayed", (8, 9), "12.0", False),
        ("delayed", (8, 0), "13.0", False),
        ("blockwise", (9, 0), "12.9", True),
        ("blockwise", (9, 0), "12.4", False),
        ("blockwise", (8, 9), "13.0", False),
        ("mxfp8", (9, 0), "13.0", False),
        ("mxfp8", (10, 0), "12.8", True),
        ("mxfp8", (12, 0), "13.0", False),
        (None, (7, 0), "11.8", True),
    ],
)
def test_recipe_refused_on_devices_that_cannot_run_it(recipe, capability, cuda, ok):
    if ok:
        check_fp8_recipe(recipe, capability, cuda)
        return
    with pytest.raises(ConfigError) as err:
        check_fp8_recipe(recipe, capability, cuda)
    msg = str(err.value)
    assert recipe in msg and f"{capability[0]}.{capability[1]}" in msg, msg
    if capability == (9, 0) and recipe == "mxfp8":
        assert "recipes this device runs: delayed, tensorwise, blockwise" in msg, msg
    if capability == (8, 0):
        assert "train in bf16" in msg, msg


# ----------------------------------------------------------------------------- backend choice


def test_auto_backend_on_gpu_without_te_says_why_and_how():
    name, warning = choose_backend(
        "auto", cuda=True, te_error="ModuleNotFoundError: No module named 'transformer_engine'"
    )
    assert name == "local"
    assert (
        "No module named 'transformer_engine'" in warning
        and "pip install --no-build-isolation 'megatron-navil[te]'" in warning
    )
    assert "\n" not in warning
    assert choose_backend("auto", cuda=True, te_error=None) == ("transformer_engine", None)
    assert choose_backend("auto", cuda=False, te_error="anything") == ("local", None)
    assert choose_backend("local", cuda=True, te_error="x") == ("local", None)
    with pytest.raises(ConfigError, match="OSError: libcudart.so.13"):
        choose_backend("transformer_engine", cuda=True, te_error="OSError: libcudart.so.13")
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        choose_backend("transformer_engine", cuda=False, te_error=None)


def test_te_import_is_really_attempted():
    # On this CPU machine Transformer Engine is not installed: the check imports, not just finds.
    err = te_import_error()
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:
        assert err is not None and type(e).__name__ in err
    else:
        assert err is None


def test_fp8_without_te_is_refused_at_model_construction(megatron_single_process):
    if te_import_error() is None and torch.cuda.is_available():
        pytest.skip("this machine runs FP8 (the GPU tests cover it)")
    with pytest.raises(ConfigError, match="needs the Transformer Engine backend"):
        NaViLModel(
            get_flavor("debug-internlm2"),
            ParallelConfig(),
            PrecisionConfig(backend="auto", fp8="delayed"),
        )
