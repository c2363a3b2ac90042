"""Conversions stream: what a conversion's peak memory owes to the model's size is a few copies
of its largest tensor, not the model.

A ~210 MB (fp32) model whose largest tensor is 8 MB and a ~2 MB model are converted HF ->
Megatron -> HF, each direction in a fresh process that records its resident set after imports
and its peak (VmHWM) after the conversion. The small model's growth is the fixed cost (process
group, meta model, plans: ~10-15 MB); the big model may add at most 3 largest tensors (25 MB;
measured ~19 MB). Holding the model would add ~200 MB; even pinning one layer of every stored
key (what torch's DCP writer does unless we free written tensors) adds ~38 MB and fails. The
big model's round trip must also reproduce its files byte for byte.
"""

import math
import subprocess
import sys

import pytest
import torch

from tests.checkpoint_tools.conftest import same_files
from tests.launcher import ROOT

pytestmark = pytest.mark.processes  # every test here starts a process

OVERRIDES = {
    "llm.hidden_size": 512,
    "llm.ffn_hidden_size": 1536,
    "llm.num_layers": 8,
    "llm.num_attention_heads": 8,
    "llm.num_query_groups": 2,
    "llm.kv_channels": 64,
    "llm.vocab_size": 4096,
    "llm.first_special_token_id": 4000,
}

CHILD = r"""
import sys, json
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from checkpoint_tools.cli import main
import megatron_navil.conversion.to_hf, megatron_navil.conversion.to_megatron  # imports first
before = status("VmRSS:")
rc = main(sys.argv[1:] + ["--no-progress"])
print(json.dumps({"rc": rc, "before": before, "peak": status("VmHWM:")}))
"""


def _generate(path, cfg):
    from megatron_navil.conversion.hf_config import to_hf_config
    from megatron_navil.conversion.outputs import write_json
    from megatron_navil.conversion.plan import hf_shapes, pairs
    from megatron_navil.conversion.released import GENERATION_CONFIG
    from megatron_navil.conversion.safetensors_io import ShardedSafetensorsWriter

    shapes = hf_shapes(cfg)
    plan = [(n, torch.float32, shapes[n]) for p in pairs(cfg) for n in p.hf]
    path.mkdir()
    w = ShardedSafetensorsWriter(path, plan, max_shard_bytes=64 * 2**20)
    g = torch.Generator().manual_seed(0)
    for name, _, shape in plan:
        w.write(name, torch.randn(shape, generator=g) * 0.02)
    w.close()
    write_json(path / "config.json", to_hf_config(cfg, "float32"))
    write_json(path / "generation_config.json", GENERATION_CONFIG)
    return w.total_bytes, max(math.prod(s) * 4 for s in shapes.values())


def _run(args):
    import json

    p = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "2"},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["rc"] == 0
    return r["peak"] - r["before"]


def _growth(d, cfg):
    total, largest = _generate(d / "hf", cfg)
    grow_in = _run(["hf-to-navil", "--hf", d / "hf", "--output", d / "ck"])
    grow_out = _run(
        [
            "navil-to-hf",
            "--load",
            d / "ck",
            "--output",
            d / "hf2",
            "--max-shard-size",
            str(64 * 2**20),
        ]
    )
    return total, largest, grow_in, grow_out


def test_peak_memory_is_a_few_tensors(tmp_path):
    from megatron_navil.config import get_flavor

    (tmp_path / "small").mkdir()
    (tmp_path / "big").mkdir()
    _, _, fixed_in, fixed_out = _growth(tmp_path / "small", get_flavor("debug-qwen3"))
    total, largest, grow_in, grow_out = _growth(
        tmp_path / "big", get_flavor("debug-qwen3").apply_overrides(OVERRIDES)
    )
    assert total > 200e6 and largest <= 8.4e6
    report = [round(x / 1e6, 1) for x in (fixed_in, grow_in, fixed_out, grow_out)]
    assert grow_in - fixed_in < 3 * largest, report
    assert grow_out - fixed_out < 3 * largest, report
    assert same_files(tmp_path / "big/hf", tmp_path / "big/hf2") == []
