"""The LLM with modality experts, in the two released HF layouts (`language_model.*`).

One decoder layer, per token t with modality mask visual[t]:
```
h = x + Attn(attention_norm(x))      QKV from wqkv_ve / *_proj_ve for visual tokens, else text;
                                     per-head q/k RMSNorm of the token's modality (Qwen3);
                                     1D RoPE on position_ids; one joint causal attention over all
                                     tokens of the sample (GQA); output projection:
                                       text:   wo(o)
                                       visual: wo_ve(wo(o))  ("composed", released 2B)
                                               wo_ve(o)      ("separate", released 9B)
y = h + FFN(ffn_norm(h))             SwiGLU down(silu(gate(x)) * up(x)), visual tokens: *_ve
```
Norms, embeddings, final norm and LM head are shared. When `attention_experts` /
`ffn_experts` is off, visual tokens use the text weights and no *_ve parameters exist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_navil.config.model import ExpertConfig, LLMConfig
from megatron_navil.reference.common import RMSNorm, attention, route
from megatron_navil.reference.rope import apply_rotary, llm_rope_angles


def pack_internlm2_wqkv(
    wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, num_query_groups: int
) -> torch.Tensor:
    """Fuse separate q/k/v weights ([H*hd, D], [G*hd, D], [G*hd, D]) into InternLM2's wqkv.

    InternLM2 groups the output rows per KV head: [q_1 .. q_g, k, v] for KV head 0, then KV
    head 1, ... (g = H/G query heads per group, each block hd rows); query head j belongs to
    KV head j // g. This is also Megatron-Core's `linear_qkv` row layout.
    """
    d = wq.shape[1]
    hd = wk.shape[0] // num_query_groups
    q = wq.reshape(num_query_groups, -1, hd, d)  # [G, g, hd, D]
    k = wk.reshape(num_query_groups, 1, hd, d)
    v = wv.reshape(num_query_groups, 1, hd, d)
    return torch.cat((q, k, v), dim=1).reshape(-1, d)  # [G*(g+2)*hd, D]


def unpack_internlm2_wqkv(wqkv: torch.Tensor, num_query_groups: int, head_dim: int):
    """Inverse of pack_internlm2_wqkv: returns (wq, wk, wv)."""
    d = wqkv.shape[1]
    blocks = wqkv.reshape(num_query_groups, -1, head_dim, d)  # [G, g+2, hd, D]
    return (
        blocks[:, :-2].reshape(-1, d),
        blocks[:, -2].reshape(-1, d),
        blocks[:, -1].reshape(-1, d),
    )


class _Attention(nn.Module):
    """Shared forward; subclasses provide `_qkv(x, expert)` and the output projections."""

    def __init__(self, cfg: LLMConfig, experts: ExpertConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_groups = cfg.num_query_groups
        self.head_dim = cfg.kv_channels
        self.rope_theta = cfg.rope_theta
        self.experts = experts.attention_experts
        self.composed = experts.output_proj_mode == "composed"

    def forward(
        self,
        x: torch.Tensor,
        visual: torch.Tensor,
        position_ids: torch.Tensor,
        segments: torch.Tensor,
    ) -> torch.Tensor:
        """x [T, D] (normed), visual [T] bool, position_ids [T], segments [T] -> [T, D]."""
        t = x.shape[0]
        visual_qkv = (lambda y: self._qkv(y, True)) if self.experts else None
        qkv = route(x, visual, lambda y: self._qkv(y, False), visual_qkv)  # [T, (H + 2G) * hd]
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_groups * self.head_dim
        q, k, v = qkv.split((q_dim, kv_dim, kv_dim), dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)  # [T, H*hd] -> [T, H, hd]
        k = k.reshape(t, self.num_groups, self.head_dim)  # [T, G*hd] -> [T, G, hd]
        v = v.reshape(t, self.num_groups, self.head_dim)
        angles = llm_rope_angles(position_ids, self.head_dim, self.rope_theta)
        q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        o = attention(q, k, v, segments, causal=True).reshape(t, q_dim)  # [T, H*hd]
        text_out = self._out(False)
        if not self.experts:
            return text_out(o)
        if self.composed:
            # Released 2B quirk: every token goes through the text projection, visual tokens
            # then also through the visual one.
            return route(text_out(o), visual, lambda y: y, self._out(True))
        return route(o, visual, text_out, self._out(True))


class InternLM2Attention(_Attention):
    """`attention.{wqkv, wo}` (+ `_ve`): fused, group-interleaved QKV (see pack_internlm2_wqkv)."""

    def __init__(self, cfg: LLMConfig, experts: ExpertConfig):
        super().__init__(cfg, experts)
        d, hd, h, g = (
            cfg.hidden_size,
            cfg.kv_channels,
            cfg.num_attention_heads,
            cfg.num_query_groups,
        )
        self.wqkv = nn.Linear(d, (h + 2 * g) * hd, bias=False)
        self.wo = nn.Linear(h * hd, d, bias=False)
        if self.experts:
            self.wqkv_ve = nn.Linear(d, (h + 2 * g) * hd, bias=False)
            self.wo_ve = nn.Linear(h * hd, d, bias=False)

    def _qkv(self, x: torch.Tensor, expert: bool) -> torch.Tensor:
        """[n, D] -> [n, (H + 2G) * hd] as [q (all heads); k; v]."""
        n, groups = x.shape[0], self.num_groups
        per_group = self.num_heads // groups + 2
        fused = (self.wqkv_ve if expert else self.wqkv)(x)
        # [n, G*(g+2)*hd] -> [n, G, g+2, hd]
        fused = fused.reshape(n, groups, per_group, self.head_dim)
        q = fused[:, :, :-2].flatten(1)  # [n, H*hd], query head j = group * g + i
        k = fused[:, :, -2].flatten(1)  # [n, G*hd]
        v = fused[:, :, -1].flatten(1)
        return torch.cat((q, k, v), dim=-1)

    def _out(self, expert: bool) -> nn.Module:
        return self.wo_ve if expert else self.wo


class Qwen3Attention(_Attention):
    """`self_attn.{q,k,v,o}_proj` (+ `_ve`), per-head `{q,k}_norm` (+ `_ve`) iff qk_layernorm."""

    def __init__(self, cfg: LLMConfig, experts: ExpertConfig):
        super().__init__(cfg, experts)
        d, hd, h, g = (
            cfg.hidden_size,
            cfg.kv_channels,
            cfg.num_attention_heads,
            cfg.num_query_groups,
        )
        self.qk_layernorm = cfg.qk_layernorm
        for suffix in ("", "_ve") if self.experts else ("",):
            setattr(self, "q_proj" + suffix, nn.Linear(d, h * hd, bias=False))
            setattr(self, "k_proj" + suffix, nn.Linear(d, g * hd, bias=False))
            setattr(self, "v_proj" + suffix, nn.Linear(d, g * hd, bias=False))
            setattr(self, "o_proj" + suffix, nn.Linear(h * hd, d, bias=False))
            if cfg.qk_layernorm:
                setattr(self, "q_norm" + suffix, RMSNorm(hd, cfg.norm_eps))
                setattr(self, "k_norm" + suffix, RMSNorm(hd, cfg.norm_eps))

    def _qkv(self, x: torch.Tensor, expert: bool) -> torch.Tensor:
        s = "_ve" if expert else ""
        n = x.shape[0]
        q = getattr(self, "q_proj" + s)(x).reshape(n, self.num_heads, self.head_dim)  # [n, H, hd]
        k = getattr(self, "k_proj" + s)(x).reshape(n, self.num_groups, self.head_dim)  # [n, G, hd]
        v = getattr(self, "v_proj" + s)(x)
        if self.qk_layernorm:
            q, k = getattr(self, "q_norm" + s)(q), getattr(self, "k_norm" + s)(k)
        return torch.cat((q.flatten(1), k.flatten(1), v), dim=-1)  # [n, (H + 2G) * hd]

    def _out(self, expert: bool) -> nn.Module:
        return self.o_proj_ve if expert else self.o_proj


class InternLM2MLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)  # gate
        self.w3 = nn.Linear(d, f, bias=False)  # up
        self.w2 = nn.Linear(f, d, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Qwen3MLP(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class InternLM2Layer(nn.Module):
    def __init__(self, cfg: LLMConfig, experts: ExpertConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.attention_norm = RMSNorm(d, cfg.norm_eps)
        self.attention = InternLM2Attention(cfg, experts)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        self.feed_forward = InternLM2MLP(d, f)
        self.feed_forward_ve = InternLM2MLP(d, f) if experts.ffn_experts else None

    def forward(self, x, visual, position_ids, segments):
        x = x + self.attention(self.attention_norm(x), visual, position_ids, segments)
        return x + route(self.ffn_norm(x), visual, self.feed_forward, self.feed_forward_ve)


class Qwen3Layer(nn.Module):
    def __init__(self, cfg: LLMConfig, experts: ExpertConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.input_layernorm = RMSNorm(d, cfg.norm_eps)
        self.self_attn = Qwen3Attention(cfg, experts)
        self.post_attention_layernorm = RMSNorm(d, cfg.norm_eps)
        self.mlp = Qwen3MLP(d, f)
        self.mlp_ve = Qwen3MLP(d, f) if experts.ffn_experts else None

    def forward(self, x, visual, position_ids, segments):
        x = x + self.self_attn(self.input_layernorm(x), visual, position_ids, segments)
        return x + route(self.post_attention_layernorm(x), visual, self.mlp, self.mlp_ve)


class _Decoder(nn.Module):
    """`language_model.model`: embedding (name set by the subclass), layers, final norm."""

    def run(self, x, visual, position_ids, segments):
        for layer in self.layers:
            x = layer(x, visual, position_ids, segments)
        return self.norm(x)


class InternLM2Decoder(_Decoder):
    def __init__(self, cfg: LLMConfig, experts: ExpertConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(InternLM2Layer(cfg, experts) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids)


class Qwen3Decoder(_Decoder):
    def __init__(self, cfg: LLMConfig, experts: ExpertConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3Layer(cfg, experts) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class LanguageModel(nn.Module):
    """`language_model`: `.model` (decoder) and the untied LM head (`output` or `lm_head`)."""

    def __init__(self, cfg: LLMConfig, experts: ExpertConfig):
        super().__init__()
        if cfg.backbone == "internlm2":
            if cfg.qk_layernorm:
                raise ValueError(
                    "llm.qk_layernorm is not part of the InternLM2 HF layout; use backbone qwen3"
                )
            if cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size:
                raise ValueError(
                    "InternLM2 derives head_dim = hidden_size / num_attention_heads = "
                    f"{cfg.hidden_size // cfg.num_attention_heads}, but llm.kv_channels is "
                    f"{cfg.kv_channels}"
                )
            self.model = InternLM2Decoder(cfg, experts)
            self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        elif cfg.backbone == "qwen3":
            self.model = Qwen3Decoder(cfg, experts)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        else:
            raise ValueError(f"unknown llm.backbone {cfg.backbone!r}; choose internlm2 or qwen3")

    @property
    def head(self) -> nn.Linear:
        return self.output if hasattr(self, "output") else self.lm_head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def forward(self, embeds, visual, position_ids, segments) -> torch.Tensor:
        """embeds [T, D] -> logits [T, vocab], float32 (float64 for a float64 model)."""
        logits = self.head(self.model.run(embeds, visual, position_ids, segments))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))
