"""External oracle: a tiny random `transformers` Qwen3ForCausalLM, converted with our production
mapping (`navil-convert llm-to-navil`), gives transformers' own text logits in the Megatron model
(loaded with the trainer's loader) and in our plain-PyTorch reference (loaded from the
`navil-to-hf` export of that checkpoint).

Nothing here shares code with our model or conversion: the source weights, config.json and
logits come from transformers 4.51.3 (`save_pretrained`, its Qwen3 modelling code: q/k RMSNorm
per head, GQA, rotate-half RoPE, SwiGLU, untied head). The model is random with non-trivial norm
weights (a norm left at 1 would hide a missing or misplaced norm) and fp32 throughout.
Tolerance: fp32, different summation orders (fused vs split GEMMs, SDPA vs explicit softmax):
observed ~1e-6; allowed 2e-5 abs / 1e-4 rel, while a mapping error (a transposed head layout, a
norm on the wrong tensor, a swapped gate/up) moves logits by 1e-2 or more.
"""

from __future__ import annotations

import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from megatron_navil.checkpoint import load_model, read_metadata  # noqa: E402
from megatron_navil.config import NaViLModelConfig, ParallelConfig, PrecisionConfig  # noqa: E402
from megatron_navil.models.navil import NaViLModel  # noqa: E402
from tests.checkpoint_tools.conftest import load_hf_tensors  # noqa: E402
from tests.checkpoint_tools.plain_llm import llm_config, make_llm_dir  # noqa: E402

LENGTHS = (23, 17)


def _transformers_qwen3(path) -> Qwen3ForCausalLM:
    """A random fp32 Qwen3 saved by transformers itself, next to a BPE tokenizer (ours: the
    tokenizer is not what is tested)."""
    make_llm_dir(path, "qwen3", seed=0, dtype=torch.float32)  # tokenizer files
    c = llm_config("qwen3", vocab=json.loads((path / "config.json").read_text())["vocab_size"])
    cfg = Qwen3Config(
        **{k: v for k, v in c.items() if k not in ("architectures", "model_type")},
        torch_dtype="float32",
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(str(path), safe_serialization=True)
    return model


def _text(cfg: NaViLModelConfig):
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, cfg.llm.first_special_token_id, (n,), generator=g) for n in LENGTHS]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    cu = torch.tensor([0, LENGTHS[0], sum(LENGTHS)], dtype=torch.int32)
    return samples, torch.cat(samples), positions, cu


def test_transformers_qwen3_logits_in_megatron_and_reference(
    tmp_path, cli, megatron_single_process
):
    hf_llm = _transformers_qwen3(tmp_path / "llm")
    rc, _, err = cli(
        [
            "llm-to-navil",
            "--hf-llm",
            tmp_path / "llm",
            "--flavor",
            "debug-qwen3",
            "--output",
            tmp_path / "ck",
            "--no-progress",
        ]
    )
    assert rc == 0, err
    cfg = NaViLModelConfig.from_dict(read_metadata(tmp_path / "ck")["model"])
    rows = hf_llm.config.vocab_size
    samples, tokens, positions, cu = _text(cfg)
    with torch.no_grad():
        want = torch.cat([hf_llm(s[None]).logits[0] for s in samples])

    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())
    load_model(tmp_path / "ck", [model], cfg)
    with torch.no_grad():
        megatron, _ = model(tokens, positions, cu)
    torch.testing.assert_close(megatron[:, :rows], want, atol=2e-5, rtol=1e-4)

    rc, _, err = cli(
        ["navil-to-hf", "--load", tmp_path / "ck", "--output", tmp_path / "hf", "--no-progress"]
    )
    assert rc == 0, err
    from megatron_navil.reference import NaViLReference

    ref = NaViLReference(cfg)
    ref.load_state_dict(load_hf_tensors(tmp_path / "hf"))
    with torch.no_grad():
        reference = ref(tokens, positions, cu)
    torch.testing.assert_close(reference[:, :rows], want, atol=2e-5, rtol=1e-4)
    # the oracle sees a difference of the size a mapping error makes
    assert (want - megatron[:, :rows]).abs().max() < 1e-3 < want.std()
