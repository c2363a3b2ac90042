"""navil-convert verify: agrees on a checkpoint and its own conversion, fails on a real change.

- a checkpoint and the HF directory it came from: exit 0, max |logit diff| ~1e-6 and KL ~1e-14
  on generated packs (images of several grids, a text-only sample) and on inputs given in a file;
  the JSON report holds the same numbers;
- one HF tensor perturbed by 1% of its scale: exit 1 ("MISMATCH") with the default tolerance,
  since the logits move by ~1e-3..1e-2 while conversion noise is ~1e-6.
"""

import json

import torch
from safetensors.torch import load_file, save_file

from megatron_navil.checkpoint import read_metadata
from megatron_navil.config import NaViLModelConfig
from megatron_navil.data.synthetic import synthetic_batch


def test_pair_agrees(cli, navil, tmp_path):
    rc, out, err = cli(
        ["verify", "--load", navil / "ck", "--hf", navil / "hf", "--json", tmp_path / "r.json"]
    )
    assert rc == 0, err
    assert out.startswith("OK:")
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["ok"] and r["positions"] > 50 and r["max_abs_diff"] < 1e-4 and r["max_kl"] < 1e-8

    cfg = NaViLModelConfig.from_dict(read_metadata(navil / "ck")["model"])
    b = synthetic_batch(cfg, 64, torch.Generator().manual_seed(9), [[5, [(4, 4)], 7], [11]])
    torch.save(
        {
            "tokens": b.tokens,
            "position_ids": b.position_ids,
            "cu_seqlens": b.cu_seqlens,
            "pixel_values": b.pixel_values,
            "grid_thw": b.grid_thw,
        },
        tmp_path / "in.pt",
    )
    rc, out, err = cli(
        ["verify", "--load", navil / "ck", "--hf", navil / "hf", "--inputs", tmp_path / "in.pt"]
    )
    assert rc == 0 and out.startswith("OK:"), (out, err)


def test_changed_weight_fails(cli, navil, tmp_path):
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(navil / "hf", hf)
    shard = next(hf.glob("*.safetensors"))
    tensors = load_file(str(shard))
    name = "language_model.model.layers.1.mlp.down_proj.weight"
    t = tensors[name]
    tensors[name] = t + 0.01 * t.abs().max() * torch.randn(
        t.shape, generator=torch.Generator().manual_seed(0)
    )
    save_file(tensors, str(shard), metadata={"format": "pt"})
    rc, out, err = cli(["verify", "--load", navil / "ck", "--hf", hf])
    assert rc == 1 and out.startswith("MISMATCH"), (out, err)
