"""llm-to-navil: the first NaViL checkpoint reproduces the source LLM on text, and everything the
LLM does not provide is initialised the way the Megatron model itself initialises it.

- Tiny plain HF LLMs (InternLM2 fp32 with a sentencepiece tokenizer; Qwen3 bf16 with a BPE
  tokenizer.json whose vocabulary ends inside the embedding's padding rows) are converted with
  the CLI; the checkpoint loads with the trainer's loader and, on a text-only pack of two
  samples, its logits over the LLM's vocabulary equal an independent plain-LLM forward
  (tests/checkpoint_tools/plain_llm.py) of each sample.
- special tokens: InternLM2 gets 12 appended rows (mean row in embedding and head), Qwen3 keeps
  its 256 rows with the tokens at 230..241 (tokenizer end); the tokenizer files next to the
  checkpoint list them (and wrap as a NaViLTokenizer for the sentencepiece model).
- visual experts are exact copies by default; `--visual-experts random` makes them fresh.
- vision encoder / connector: constants (zero biases, unit norms, LayerScale) equal a freshly
  built Megatron model's exactly, random weights have its std (within 15%: ~1-3% sampling error
  on these tensor sizes, while a wrong rule - unscaled output init, N(0,1) - is off by 2x+).
- a tied-embedding LLM (no lm_head tensor) gets its head from the embedding.
Logit tolerance: fp32, different summation orders: observed ~1e-6; allowed 2e-5 abs / 1e-4 rel.
"""

import json

import pytest
import torch

from megatron_navil.checkpoint import load_model, read_metadata
from megatron_navil.config import NaViLModelConfig, ParallelConfig, PrecisionConfig
from megatron_navil.models.navil import NaViLModel
from tests.checkpoint_tools.plain_llm import llm_logits, make_llm_dir

FLAVOR = {"internlm2": "debug-internlm2", "qwen3": "debug-qwen3"}
DTYPE = {"internlm2": torch.float32, "qwen3": torch.bfloat16}


def _convert(tmp_path, cli, backbone, *extra, tied=False):
    llm = tmp_path / "llm"
    c, w = make_llm_dir(llm, backbone, seed=4, dtype=DTYPE[backbone])
    if tied:
        c["tie_word_embeddings"] = True
        from safetensors.torch import save_file

        w.pop("output.weight" if backbone == "internlm2" else "lm_head.weight")
        save_file(w, str(llm / "model.safetensors"))
        (llm / "config.json").write_text(json.dumps(c))
    rc, out, err = cli(
        [
            "llm-to-navil",
            "--hf-llm",
            llm,
            "--flavor",
            FLAVOR[backbone],
            "--output",
            tmp_path / "ck",
            "--no-progress",
            *extra,
        ]
    )
    assert rc == 0, err
    cfg = NaViLModelConfig.from_dict(read_metadata(tmp_path / "ck")["model"])
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())
    load_model(tmp_path / "ck", [model], cfg)
    return c, w, cfg, model


@pytest.mark.parametrize("backbone", ["internlm2", "qwen3"])
def test_text_logits_reproduce_the_llm(tmp_path, cli, megatron_single_process, backbone):
    c, w, cfg, model = _convert(tmp_path, cli, backbone)
    rows = c["vocab_size"]
    g = torch.Generator().manual_seed(0)
    # Text tokens: every id below the special tokens (those would be routed/replaced by NaViL).
    samples = [
        torch.randint(0, cfg.llm.first_special_token_id, (n,), generator=g) for n in (29, 19)
    ]
    tokens = torch.cat(samples)
    positions = torch.cat([torch.arange(s.numel()) for s in samples])
    cu = torch.tensor([0, 29, 48], dtype=torch.int32)
    with torch.no_grad():
        logits, got_rows = model(tokens, positions, cu)
    assert torch.equal(got_rows, torch.arange(48))
    expected = torch.cat([llm_logits(backbone, c, w, s) for s in samples])
    torch.testing.assert_close(logits[:, :rows], expected, atol=2e-5, rtol=1e-4)

    sd = model.state_dict()
    # Visual experts start as exact copies of the text weights.
    for k, v in sd.items():
        if k.endswith("_extra_state"):
            continue
        if ".visual." in k:
            assert torch.equal(v, sd[k.replace(".visual.", ".text.")]), k
        if "local_experts.1." in k:
            assert torch.equal(v, sd[k.replace("local_experts.1.", "local_experts.0.")]), k
    emb, head = sd["language_model.embedding.weight"], sd["language_model.output_layer.weight"]
    first = cfg.llm.first_special_token_id
    if backbone == "internlm2":  # 224 tokenizer pieces: 12 rows appended, the mean row
        assert (first, cfg.llm.vocab_size) == (224, 236)
        assert torch.allclose(emb[224:236], emb[:224].mean(0).expand(12, -1), atol=1e-6)
        assert torch.allclose(head[224:236], head[:224].mean(0).expand(12, -1), atol=1e-6)
        from megatron_navil.data.tokenizer import NaViLTokenizer

        tok = NaViLTokenizer.load(str(tmp_path / "ck/tokenizer"))
        assert tok.special_token_id("<IMG_CONTEXT>") == cfg.img_context_id == 226
    else:  # the BPE vocabulary ends at 230: specials inside the 256 existing rows
        assert (first, cfg.llm.vocab_size) == (230, 256)
        assert torch.equal(emb[:256], w["model.embed_tokens.weight"].float())
        added = json.loads((tmp_path / "ck/tokenizer/tokenizer.json").read_text())["added_tokens"]
        assert {"</box>": 230, "<IMG_FRAME_BREAK>": 241}.items() <= {
            a["content"]: a["id"] for a in added
        }.items()
    special = sd["language_model.special_token_embedding.weight"]
    assert (
        special.shape == (12, cfg.llm.hidden_size) and torch.unique(special, dim=0).shape[0] == 12
    )


def test_fresh_weights_follow_megatron_init(tmp_path, cli, megatron_single_process):
    _, _, cfg, model = _convert(tmp_path, cli, "qwen3", "--visual-experts", "random", "--seed", "3")
    torch.manual_seed(11)
    fresh = NaViLModel(cfg, ParallelConfig(), PrecisionConfig()).state_dict()
    ours = model.state_dict()
    checked = 0
    for k, v in ours.items():
        if k.endswith("_extra_state"):
            continue
        if k.startswith(("vision_model", "connector")) or ".visual." in k or "local_experts.1" in k:
            ref = fresh[k]
            if bool((ref == ref.flatten()[0]).all()):  # constants: zeros, ones, LayerScale
                assert torch.equal(v, ref.to(torch.bfloat16).float()), k  # stored as the LLM's bf16
            else:
                assert abs(v.float().std() / ref.std() - 1) < 0.15, (k, v.float().std(), ref.std())
            checked += 1
    assert checked > 30
    assert not torch.equal(
        ours["language_model.decoder.layers.0.self_attention.linear_qkv.visual.weight"],
        ours["language_model.decoder.layers.0.self_attention.linear_qkv.text.weight"],
    )


def test_tied_llm_and_explicit_special_start(tmp_path, cli, megatron_single_process):
    c, w, cfg, model = _convert(
        tmp_path, cli, "qwen3", "--first-special-token-id", "240", tied=True
    )
    assert (cfg.llm.first_special_token_id, cfg.llm.vocab_size) == (240, 256)
    sd = model.state_dict()
    assert torch.equal(
        sd["language_model.output_layer.weight"][:256], w["model.embed_tokens.weight"].float()
    )
