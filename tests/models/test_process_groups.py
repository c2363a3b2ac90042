"""One process-group source: the model takes every group from the ProcessGroupCollection it is
built with, and no module under megatron_navil/models reads Megatron's parallel_state globals.

- Source (ast): under megatron_navil/models only `navil.default_process_groups` (the fallback
  for a caller that passes no collection) touches `parallel_state` or
  `ProcessGroupCollection.use_mpu_process_groups`.
- Build and run: the debug models (both backbones; attention and FFN experts on and off) built
  with a collection of groups the test made (new 1-rank gloo groups, none of them Megatron's)
  hold exactly those groups in every module that keeps one (tp_group, TPRegion, the MoE layer's
  EP group), construction and a training forward/backward call no parallel_state getter except
  where Megatron-Core 0.16.1's own RowParallelLinear reads (and then ignores) the global TP group
  inside its GEMM helper, and the loss and every gradient are bit-identical to those of the
  same model built with Megatron's groups.
Where to look on failure: the module named in the message; models/navil.py builds the
collection.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
from megatron_navil.data.synthetic import synthetic_batch
from megatron_navil.models.navil import NaViLModel
from megatron_navil.models.tp_regions import TPRegion

MODELS = Path(__file__).resolve().parents[2] / "megatron_navil" / "models"
GLOBAL_NAMES = {"parallel_state", "use_mpu_process_groups"}
ALLOWED = {("navil.py", "default_process_groups")}
"""(file, function) under models/ that may read Megatron's global groups."""

# Megatron-Core 0.16.1 RowParallelLinear.forward passes tp_group=None to its GEMM helper, which
# looks the global group up and, with allreduce_dgrad and sequence_parallel both False there,
# never uses it. Not ours to change; the only global read left in a forward.
MEGATRON_READS = {("utils.py", "get_tensor_model_parallel_group_if_none")}

GROUP_FIELDS = ("tp", "pp", "mp", "cp", "tp_cp", "ep", "expt_tp", "tp_ep", "tp_ep_pp", "expt_dp")
GROUP_FIELDS += ("dp", "dp_cp", "embd", "pos_embd")


def _global_reads_in(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        names = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name.split(".")[-1] for a in node.names]
            names += [(getattr(node, "module", None) or "").split(".")[-1]]
        for name in names:
            if name in GLOBAL_NAMES and (path.name, function) not in ALLOWED:
                found.append(f"{path.name}:{node.lineno} ({function}): {name}")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def test_no_model_module_reads_global_groups():
    found = [hit for f in sorted(MODELS.glob("*.py")) for hit in _global_reads_in(f)]
    assert not found, "models/ reads Megatron's global groups:\n" + "\n".join(found)


def test_the_source_check_sees_a_global_read(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from megatron.core import parallel_state\n"
        "def f():\n    return parallel_state.get_tensor_model_parallel_group()\n"
        "def g():\n    return ProcessGroupCollection.use_mpu_process_groups()\n"
    )
    found = _global_reads_in(bad)
    assert [hit.split(" ")[0] for hit in found] == ["bad.py:1", "bad.py:3", "bad.py:5"], found


@pytest.fixture
def global_reads(monkeypatch):
    """Calls of any parallel_state getter: (file, function) of the caller."""
    calls = []
    for name in dir(parallel_state):
        fn = getattr(parallel_state, name)
        if name.startswith(("get_", "is_")) and callable(fn):

            def recorder(*args, _fn=fn, _name=name, **kwargs):
                caller = sys._getframe(1).f_code
                calls.append((Path(caller.co_filename).name, caller.co_name, _name))
                return _fn(*args, **kwargs)

            monkeypatch.setattr(parallel_state, name, recorder)
    return calls


def _custom_groups() -> ProcessGroupCollection:
    return ProcessGroupCollection(**{f: torch.distributed.new_group([0]) for f in GROUP_FIELDS})


def _loss_and_grads(model, cfg):
    model.train()
    batch = synthetic_batch(cfg, 160, torch.Generator().manual_seed(3))
    loss = model(**batch.model_inputs())
    loss.sum().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


VARIANTS = {
    "internlm2": ("debug-internlm2", {}),
    "qwen3_vit_qk_norm": ("debug-qwen3", {"vision.qk_normalization": True}),
    "no_experts": (
        "debug-qwen3",
        {"experts.attention_experts": False, "experts.ffn_experts": False},
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_uses_only_the_groups_it_is_given(megatron_single_process, global_reads, name):
    flavor, overrides = VARIANTS[name]
    cfg = get_flavor(flavor).apply_overrides(overrides)
    groups = _custom_groups()
    torch.manual_seed(0)
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig(), pg_collection=groups)
    loss, grads = _loss_and_grads(model, cfg)
    reads = {(f, fn) for f, fn, _ in global_reads}
    assert reads <= MEGATRON_READS, f"parallel_state read by {sorted(reads - MEGATRON_READS)}"

    given = {id(getattr(groups, f)) for f in GROUP_FIELDS}
    checked = 0
    for mod_name, module in model.named_modules():
        # (the experts' tp_group is the collection's expert-TP group)
        for attr in ("tp_group", "ep_group"):
            group = getattr(module, attr, None)
            if group is not None:
                assert id(group) in given, f"{mod_name}.{attr} is not from the collection"
                checked += 1
        region = getattr(module, "tp_region", None)
        if isinstance(region, TPRegion):
            assert region.group is groups.tp, f"{mod_name}.tp_region"
            checked += 1
    assert checked > 20, "too few modules hold a group: the check would prove nothing"

    torch.manual_seed(0)
    reference = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())  # Megatron's groups
    ref_loss, ref_grads = _loss_and_grads(reference, cfg)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert (g is None and ref_grads[n] is None) or torch.equal(g, ref_grads[n]), n
