"""HF -> Megatron (loaded at TP=2, PP=2, EP=2) -> HF is bit-identical, and the Megatron model's
logits equal the plain-PyTorch reference's logits on the exported HF weights.

The distributed test converts a random debug-qwen3 model (with the ViT's full-width q/k norm and
qkv bias, so every kind of TP split occurs) with `navil-convert hf-to-navil`, then an 8-process
gloo job (TP=2 x PP=2 x EP=2, sequence parallel, DP=2) loads it with the trainer's loader, checks
each rank's local parameters against the registry's TP split of the canonical tensors, runs one
packed batch (images of several sizes and scales, text-only sample, padding) through Megatron's
pipeline schedule, and re-saves at that layout; `navil-convert navil-to-hf` on the re-saved
checkpoint must reproduce the original HF files byte for byte. The InternLM2 layout (fused wqkv,
composed output projection) gets the same round trip at TP=1 in process, plus a directory
written by the safetensors library itself (single file, no index, other tensor order).

Tolerance: weights are moved, never recomputed, so files and tensors must be identical.
Logits: fp32 on CPU, the two implementations order sums differently (split GEMMs, TP
all-reduces, SDPA vs explicit softmax): observed ~1e-6; allowed 2e-5 abs / 1e-4 rel, while any
mapping error (transposed heads, swapped experts, wrong split) is O(1e-2) or more.
"""

import json

import pytest
import torch

from megatron_navil.config import ParallelConfig, PrecisionConfig
from megatron_navil.data.synthetic import synthetic_batch
from tests.checkpoint_tools.conftest import load_hf_tensors, make_navil_hf, same_files
from tests.launcher import launch

SAMPLES = [[3, [(2, 4), (4, 6)], 5], [7], [2, [(4, 2)], 3]]


def _inputs(cfg, seq_length=96, seed=1):
    b = synthetic_batch(cfg, seq_length, torch.Generator().manual_seed(seed), SAMPLES)
    return {
        "tokens": b.tokens,
        "position_ids": b.position_ids,
        "cu_seqlens": b.cu_seqlens,
        "pixel_values": b.pixel_values,
        "grid_thw": b.grid_thw,
    }


def _reference_logits(cfg, hf_dir, inp):
    from megatron_navil.reference import NaViLReference

    ref = NaViLReference(cfg)
    ref.load_state_dict(load_hf_tensors(hf_dir))  # strict: every key, nothing else
    with torch.no_grad():
        return ref(
            inp["tokens"],
            inp["position_ids"],
            inp["cu_seqlens"],
            inp["pixel_values"],
            inp["grid_thw"],
        )


@pytest.mark.distributed
def test_tp2_pp2_ep2_roundtrip_is_bit_identical(tmp_path, cli):
    hf = tmp_path / "hf"
    cfg, _ = make_navil_hf(
        hf, "debug-qwen3", {"vision.qk_normalization": True, "vision.qkv_bias": True}
    )
    rc, out, err = cli(
        [
            "hf-to-navil",
            "--hf",
            hf,
            "--output",
            tmp_path / "ck",
            "--tensor-model-parallel-size",
            2,
            "--pipeline-model-parallel-size",
            2,
            "--expert-model-parallel-size",
            2,
            "--no-progress",
        ]
    )
    assert rc == 0, err
    meta = json.loads((tmp_path / "ck/iter_0000000/navil_checkpoint.json").read_text())
    assert meta["converted"]["requested_layout"]["expert_model_parallel_size"] == 2

    inp = _inputs(cfg)
    torch.save(inp, tmp_path / "inputs.pt")
    launch(
        "tests.checkpoint_tools.layout_worker",
        8,
        [
            "--load",
            tmp_path / "ck",
            "--inputs",
            tmp_path / "inputs.pt",
            "--out",
            tmp_path / "r",
            "--resave",
            tmp_path / "resaved",
            "--tp",
            "2",
            "--pp",
            "2",
            "--ep",
            "2",
        ],
    )
    results = [torch.load(tmp_path / f"r.rank{r}.pt", weights_only=True) for r in range(8)]
    assert all(not r["bad_splits"] for r in results), [r["bad_splits"] for r in results]

    ref = _reference_logits(cfg, hf, inp)
    last = [r for r in results if r["logits"] is not None]
    assert len(last) == 4  # TP 2 x DP 2 ranks of the last pipeline stage
    for r in last:
        assert torch.equal(r["rows"], (inp["tokens"] != cfg.img_context_id).nonzero().squeeze(1))
        torch.testing.assert_close(
            r["logits"][:, : cfg.llm.vocab_size], ref[r["rows"]], atol=2e-5, rtol=1e-4
        )

    rc, out, err = cli(
        [
            "navil-to-hf",
            "--load",
            tmp_path / "resaved",
            "--output",
            tmp_path / "hf2",
            "--max-shard-size",
            "400000",
            "--no-progress",
        ]
    )
    assert rc == 0, err
    assert same_files(hf, tmp_path / "hf2") == []


def test_internlm2_roundtrip_and_logits(tmp_path, cli, megatron_single_process):
    from megatron_navil.checkpoint import load_model
    from megatron_navil.models.navil import NaViLModel

    hf = tmp_path / "hf"
    cfg, ref = make_navil_hf(
        hf,
        "debug-internlm2",
        {"vision.window_size": 64, "vision.fullatt_block_indexes": [1]},
        seed=3,
    )
    assert cli(["hf-to-navil", "--hf", hf, "--output", tmp_path / "ck", "--no-progress"])[0] == 0
    assert (
        cli(
            [
                "navil-to-hf",
                "--load",
                tmp_path / "ck",
                "--output",
                tmp_path / "hf2",
                "--max-shard-size",
                "400000",
                "--no-progress",
            ]
        )[0]
        == 0
    )
    assert same_files(hf, tmp_path / "hf2") == []
    sd = ref.state_dict()
    got = load_hf_tensors(tmp_path / "hf2")
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)

    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())
    load_model(tmp_path / "ck", [model], cfg)
    inp = _inputs(cfg, 128, seed=2)
    with torch.no_grad():
        logits, rows = model(
            inp["tokens"],
            inp["position_ids"],
            inp["cu_seqlens"],
            pixel_values=inp["pixel_values"],
            grid_thw=inp["grid_thw"],
        )
    torch.testing.assert_close(
        logits[:, : cfg.llm.vocab_size], _reference_logits(cfg, hf, inp)[rows], atol=2e-5, rtol=1e-4
    )


def test_directory_from_the_safetensors_library(tmp_path, cli):
    """A single model.safetensors (no index) written by safetensors.save_file, bf16."""
    from safetensors.torch import save_file

    from megatron_navil.conversion.hf_config import to_hf_config

    src = tmp_path / "ours"
    cfg, ref = make_navil_hf(src, "debug-qwen3", seed=5)
    hf = tmp_path / "hub"
    hf.mkdir()
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(to_hf_config(cfg, "bfloat16")))
    assert cli(["hf-to-navil", "--hf", hf, "--output", tmp_path / "ck", "--no-progress"])[0] == 0
    assert (
        cli(
            [
                "navil-to-hf",
                "--load",
                tmp_path / "ck",
                "--output",
                tmp_path / "back",
                "--no-progress",
            ]
        )[0]
        == 0
    )
    back = load_hf_tensors(tmp_path / "back")
    assert set(back) == set(tensors)
    assert all(
        back[k].dtype == torch.bfloat16 and torch.equal(back[k], tensors[k]) for k in tensors
    )
    config = json.loads((tmp_path / "back/config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["model_type"] == "navil_chat"
