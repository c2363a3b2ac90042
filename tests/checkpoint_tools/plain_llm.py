"""Tiny plain HF LLM directories (InternLM2 / Qwen3 layout) and an independent plain-LLM forward.

`make_llm_dir` writes what a user downloads from the Hub: `config.json` with the standard HF
fields and `model.safetensors` (written with the safetensors library itself) with the standard
key names, plus tokenizer files: a sentencepiece `tokenizer.model` (InternLM2 style) or a BPE
`tokenizer.json` whose vocabulary ends before the embedding's padding rows (Qwen3 style).

`llm_logits` is the textbook decoder written from the HF modeling code's conventions (written for
these tests, sharing nothing with megatron_navil): RMSNorm, rotate-half RoPE, GQA with
`repeat_kv`, causal softmax attention, SwiGLU, untied head; InternLM2's fused `wqkv` is split the
way `modeling_internlm2.py` does (`rearrange(b q (h gs d) -> b q h gs d)`, q = first gs-2 slots).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def llm_config(backbone: str, vocab: int = 224) -> dict:
    c = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 3,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
    }
    if backbone == "internlm2":
        c.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False)
    else:
        c.update(
            architectures=["Qwen3ForCausalLM"],
            model_type="qwen3",
            head_dim=16,
            attention_bias=False,
        )
    return c


def random_llm_weights(backbone: str, c: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, f, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    h, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim", d // h)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    def norm(n):
        return 1 + 0.1 * torch.randn(n, generator=g)

    out = {}
    if backbone == "internlm2":
        out["model.tok_embeddings.weight"] = w(v, d)
        out["output.weight"] = w(v, d)
        for i in range(L):
            p = f"model.layers.{i}."
            out[p + "attention.wqkv.weight"] = w((h + 2 * kv) * hd, d)
            out[p + "attention.wo.weight"] = w(d, h * hd)
            out[p + "feed_forward.w1.weight"] = w(f, d)
            out[p + "feed_forward.w3.weight"] = w(f, d)
            out[p + "feed_forward.w2.weight"] = w(d, f)
            out[p + "attention_norm.weight"] = norm(d)
            out[p + "ffn_norm.weight"] = norm(d)
    else:
        out["model.embed_tokens.weight"] = w(v, d)
        out["lm_head.weight"] = w(v, d)
        for i in range(L):
            p = f"model.layers.{i}."
            out[p + "self_attn.q_proj.weight"] = w(h * hd, d)
            out[p + "self_attn.k_proj.weight"] = w(kv * hd, d)
            out[p + "self_attn.v_proj.weight"] = w(kv * hd, d)
            out[p + "self_attn.o_proj.weight"] = w(d, h * hd)
            out[p + "self_attn.q_norm.weight"] = norm(hd)
            out[p + "self_attn.k_norm.weight"] = norm(hd)
            out[p + "mlp.gate_proj.weight"] = w(f, d)
            out[p + "mlp.up_proj.weight"] = w(f, d)
            out[p + "mlp.down_proj.weight"] = w(d, f)
            out[p + "input_layernorm.weight"] = norm(d)
            out[p + "post_attention_layernorm.weight"] = norm(d)
    out["model.norm.weight"] = norm(d)
    return out


def sentencepiece_model(vocab: int) -> bytes:
    import io

    import sentencepiece as spm

    g = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [
        "".join(letters[i] for i in torch.randint(0, 26, (int(n),), generator=g))
        for n in torch.randint(2, 7, (300,), generator=g)
    ]
    texts = [
        " ".join(words[int(i)] for i in torch.randint(0, 300, (12,), generator=g))
        for _ in range(400)
    ]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=vocab,
        model_type="bpe",
        hard_vocab_limit=True,
        minloglevel=2,
        byte_fallback=False,
        num_threads=1,
    )
    return buf.getvalue()


def make_llm_dir(
    path: Path,
    backbone: str,
    seed: int = 0,
    tokenizer: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict, dict]:
    """Write a plain HF LLM directory; returns (config, weights). InternLM2: 224 embedding
    rows = the sentencepiece vocabulary (specials get appended). Qwen3: 256 rows, the BPE
    tokenizer ends at 230 (specials go inside the padding rows)."""
    path.mkdir(parents=True)
    rows = 224 if backbone == "internlm2" else 256
    c = llm_config(backbone, rows)
    weights = {k: v.to(dtype) for k, v in random_llm_weights(backbone, c, seed).items()}
    c["torch_dtype"] = str(dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(c, indent=2))
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer and backbone == "internlm2":
        (path / "tokenizer.model").write_bytes(sentencepiece_model(rows))
    elif tokenizer:
        vocab = {f"t{i}": i for i in range(220)}
        added = [{"id": 220 + i, "content": f"<|extra_{i}|>", "special": True} for i in range(10)]
        (path / "tokenizer.json").write_text(
            json.dumps(
                {"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added}
            )
        )
    return c, weights


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = pos.float()[:, None] * inv[None, :]
    emb = torch.cat((ang, ang), -1)[:, None, :]
    rot = torch.cat((-x[..., hd // 2 :], x[..., : hd // 2]), -1)
    return x * emb.cos() + rot * emb.sin()


def llm_logits(backbone: str, c: dict, w: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] of ONE sample (positions 0..T-1), float32."""
    w = {k: v.float() for k, v in w.items()}
    d, h, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd, eps, t = c.get("head_dim", d // h), c["rms_norm_eps"], ids.numel()
    pos = torch.arange(t)
    x = w[
        "model.tok_embeddings.weight" if backbone == "internlm2" else "model.embed_tokens.weight"
    ][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if backbone == "internlm2":
            a = _rms(x, w[p + "attention_norm.weight"], eps)
            qkv = (a @ w[p + "attention.wqkv.weight"].T).view(t, kv, h // kv + 2, hd)
            q, k, v = qkv[:, :, :-2].reshape(t, h, hd), qkv[:, :, -2], qkv[:, :, -1]
            wo, gate, up, down = (
                w[p + n]
                for n in (
                    "attention.wo.weight",
                    "feed_forward.w1.weight",
                    "feed_forward.w3.weight",
                    "feed_forward.w2.weight",
                )
            )
            ffn_norm = w[p + "ffn_norm.weight"]
        else:
            a = _rms(x, w[p + "input_layernorm.weight"], eps)
            q = _rms(
                (a @ w[p + "self_attn.q_proj.weight"].T).view(t, h, hd),
                w[p + "self_attn.q_norm.weight"],
                eps,
            )
            k = _rms(
                (a @ w[p + "self_attn.k_proj.weight"].T).view(t, kv, hd),
                w[p + "self_attn.k_norm.weight"],
                eps,
            )
            v = (a @ w[p + "self_attn.v_proj.weight"].T).view(t, kv, hd)
            wo, gate, up, down = (
                w[p + n]
                for n in (
                    "self_attn.o_proj.weight",
                    "mlp.gate_proj.weight",
                    "mlp.up_proj.weight",
                    "mlp.down_proj.weight",
                )
            )
            ffn_norm = w[p + "post_attention_layernorm.weight"]
        q, k = _rope(q, pos, c["rope_theta"]), _rope(k, pos, c["rope_theta"])
        k, v = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)  # repeat_kv
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(t, h * hd)
        x = x + o @ wo.T
        m = _rms(x, ffn_norm, eps)
        x = x + (torch.nn.functional.silu(m @ gate.T) * (m @ up.T)) @ down.T
    x = _rms(x, w["model.norm.weight"], eps)
    return x @ w["output.weight" if backbone == "internlm2" else "lm_head.weight"].T
