"""Full-size NaViL-2B and NaViL-9B key/shape mapping, checked on the meta device (no memory).

For each flavor (and the debug variants that switch mapping branches on or off):
- the registry's HF names and shapes are exactly the reference model's (HF layout) state dict;
- the registry's Megatron names and transformed shapes are exactly the Megatron model's
  parameters (built on the meta device through the writer's own layout code);
- `stored_parts` (what the reader uses, no model needed) names exactly the keys Megatron's own
  `sharded_state_dict()` gives every parameter (gated fc1 as `_w`/`_v` halves), and the
  writer's strided views cover every parameter exactly;
- the flavors fit the TP splits they should (2B: TP 1, 2, 4 - its 12-head ViT cannot split 8
  ways; 9B: TP 1-8) and a TP that cannot divide the heads is refused naming the parameter.
Exact equality throughout: these are names and integer shapes.
"""

import math

import pytest
import torch

from megatron_navil.checkpoint.keys import stored_parts
from megatron_navil.config import ParallelConfig, get_flavor
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.layout import canonical_sharded_layout
from megatron_navil.conversion.plan import check_layout, hf_shapes, megatron_shapes, pairs

CASES = {
    "navil-2b": ("navil-2b", {}),
    "navil-9b": ("navil-9b", {}),
    "no_experts": (
        "debug-qwen3",
        {"experts.attention_experts": False, "experts.ffn_experts": False},
    ),
    "vit_qk_norm_bias": (
        "debug-internlm2",
        {"vision.qk_normalization": True, "vision.qkv_bias": True},
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    flavor, overrides = CASES[request.param]
    cfg = get_flavor(flavor).apply_overrides(overrides)
    return request.param, cfg, canonical_sharded_layout(cfg, torch.bfloat16)


def test_registry_covers_both_layouts_exactly(case, megatron_single_process):
    name, cfg, layout = case
    hf = hf_shapes(cfg)
    used = [n for p in pairs(cfg) for n in p.hf]
    assert len(used) == len(set(used)) and set(used) == set(hf)
    meg = megatron_shapes(cfg)
    assert {k: s for k, (s, _) in layout.params.items()} == meg
    assert all(d == torch.bfloat16 for _, d in layout.params.values())
    if name.startswith("navil"):  # the parameter count the flavor promises
        padding = (
            2
            * (meg["language_model.embedding.weight"][0] - cfg.llm.vocab_size)
            * cfg.llm.hidden_size
        )
        assert sum(math.prod(s) for s in meg.values()) == cfg.num_parameters()[0] + padding


def test_reader_locations_match_megatron_sharded_state_dict(case, megatron_single_process):
    _, cfg, layout = case
    keys = {st.key for st in layout.tensors}
    covered: dict[str, int] = {}
    for st, view in zip(layout.tensors, layout.views):
        parts = stored_parts(keys, view.param)
        assert st.key in parts, view.param
        assert all(o == 0 for o in st.global_offset[1:]), view.param  # one key per parameter
        rows = sum(next(t.global_shape[0] for t in layout.tensors if t.key == k) for k in parts)
        shape = layout.params[view.param][0]
        assert (rows,) + tuple(st.global_shape[1:]) == shape, view.param
        covered[view.param] = covered.get(view.param, 0) + math.prod(view.size)
    assert covered == {k: math.prod(s) for k, (s, _) in layout.params.items()}
    # the reader needs no model: its key for each parameter is the one Megatron saves
    assert {k for p in layout.params for k in stored_parts(keys, p)} == keys


def _layout(tp):
    return ParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        pipeline_model_parallel_size=2,
        expert_model_parallel_size=2,
    )


@pytest.mark.parametrize(
    "flavor,tps,refused",
    [
        ("navil-2b", (1, 2, 4), {3: "language_model.embedding", 8: "vision_model.*linear_qkv"}),
        (
            "navil-9b",
            (1, 2, 4, 8),
            {3: "vision_model.*linear_qkv", 16: "language_model.*linear_qkv"},
        ),
    ],
)
def test_flavors_fit_tp_splits(flavor, tps, refused):
    cfg = get_flavor(flavor)
    for tp in tps:
        check_layout(cfg, _layout(tp))
    for tp, param in refused.items():
        with pytest.raises(ConversionError, match=f"{param}.*tensor-model-parallel-size {tp};"):
            check_layout(cfg, _layout(tp))
