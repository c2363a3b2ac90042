"""LLM attention/FFN modules: fused QKV layout, GQA, per-modality routing, output projection modes.

Module-level properties that a wrong layout or routing would break (float64; "unchanged" to
1e-12, each with a control showing the perturbation matters):
- InternLM2 wqkv packed from separate q/k/v equals a naive per-head GQA causal attention;
- Qwen3 per-head q/k norms are per modality: text norms never touch visual rows and vice versa;
- FFN routing: text FFN weights never touch visual rows (and vice versa);
- output projection: "composed" with wo = I equals "separate"; with a random wo they differ only
  at visual rows.
"""

import math

import torch
from reference_helpers import EXACT, make_cfg

from megatron_navil.reference import pack_internlm2_wqkv, unpack_internlm2_wqkv
from megatron_navil.reference.common import route
from megatron_navil.reference.llm import InternLM2Attention, Qwen3Attention
from megatron_navil.reference.rope import apply_rotary, llm_rope_angles


def _inputs(t=7, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g, dtype=torch.float64)
    visual = torch.tensor([False, True, True, False, True, False, False])[:t]
    return x, visual, torch.arange(t), torch.zeros(t, dtype=torch.long)


def _attn(cls, flavor, overrides=None, seed=0):
    cfg = make_cfg(flavor, overrides)
    torch.manual_seed(seed)
    m = cls(cfg.llm, cfg.experts).double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in n else 0.0))
    return m, cfg


def test_internlm2_wqkv_layout_matches_naive_per_head_attention():
    m, cfg = _attn(InternLM2Attention, "debug-internlm2", {"experts.attention_experts": False})
    h, g, hd, d = (
        cfg.llm.num_attention_heads,
        cfg.llm.num_query_groups,
        cfg.llm.kv_channels,
        cfg.llm.hidden_size,
    )
    gen = torch.Generator().manual_seed(1)
    wq, wk, wv = (
        torch.randn(n * hd, d, generator=gen, dtype=torch.float64) * 0.2 for n in (h, g, g)
    )
    with torch.no_grad():
        m.wqkv.weight.copy_(pack_internlm2_wqkv(wq, wk, wv, g))
    x, _, pos, seg = _inputs()
    got = m(x, torch.zeros(len(x), dtype=torch.bool), pos, seg)

    angles = llm_rope_angles(pos, hd, cfg.llm.rope_theta)
    t = len(x)
    heads = []
    for j in range(h):
        kv = j // (h // g)  # query head j reads kv head j // (H / G)
        q = apply_rotary((x @ wq[j * hd : (j + 1) * hd].T)[:, None], angles)[:, 0]
        k = apply_rotary((x @ wk[kv * hd : (kv + 1) * hd].T)[:, None], angles)[:, 0]
        v = x @ wv[kv * hd : (kv + 1) * hd].T
        s = q @ k.T / math.sqrt(hd)
        s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        heads.append(s.softmax(-1) @ v)
    want = torch.cat(heads, dim=-1) @ m.wo.weight.T
    torch.testing.assert_close(got, want, **EXACT)


def test_wqkv_pack_roundtrip_and_is_group_interleaved():
    hd, d = 2, 3
    wq = torch.arange(4 * hd * d, dtype=torch.float64).view(4 * hd, d)  # 4 heads
    wk = -torch.ones(2 * hd, d, dtype=torch.float64)  # 2 groups
    wv = -2 * torch.ones(2 * hd, d, dtype=torch.float64)
    packed = pack_internlm2_wqkv(wq, wk, wv, 2)
    # rows: [q0, q1, k0, v0, q2, q3, k1, v1], hd rows each
    want = torch.cat([wq[0:4], wk[0:2], wv[0:2], wq[4:8], wk[2:4], wv[2:4]])
    torch.testing.assert_close(packed, want, rtol=0, atol=0)
    for a, b in zip(unpack_internlm2_wqkv(packed, 2, hd), (wq, wk, wv)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_qwen3_qk_norms_are_per_modality():
    m, _ = _attn(Qwen3Attention, "debug-qwen3")
    x, visual, pos, seg = _inputs()
    base = m(x, visual, pos, seg)
    for name, untouched in (("q_norm", visual), ("q_norm_ve", ~visual)):
        with torch.no_grad():
            getattr(m, name).weight.mul_(1.7)
        out = m(x, visual, pos, seg)
        with torch.no_grad():
            getattr(m, name).weight.div_(1.7)
        # a query norm only changes the rows of its own modality
        torch.testing.assert_close(out[untouched], base[untouched], **EXACT)
        assert (out[~untouched] - base[~untouched]).abs().max() > 1e-4
    # key norms are seen by every later query: changing k_norm (text keys) changes visual rows too
    with torch.no_grad():
        m.k_norm.weight.mul_(1.7)
    assert (m(x, visual, pos, seg)[visual] - base[visual]).abs().max() > 1e-4


def test_ffn_routing_keeps_modalities_apart():
    from megatron_navil.reference.llm import InternLM2MLP

    torch.manual_seed(0)
    text, vis = InternLM2MLP(8, 16).double(), InternLM2MLP(8, 16).double()
    x, visual = torch.randn(7, 8, dtype=torch.float64), _inputs()[1]
    base = route(x, visual, text, vis)
    torch.testing.assert_close(base[~visual], text(x)[~visual], **EXACT)
    torch.testing.assert_close(base[visual], vis(x)[visual], **EXACT)
    with torch.no_grad():
        text.w1.weight.add_(0.5)
    out = route(x, visual, text, vis)
    torch.testing.assert_close(out[visual], base[visual], **EXACT)
    assert (out[~visual] - base[~visual]).abs().max() > 1e-4


def test_composed_vs_separate_output_projection():
    comp, _ = _attn(InternLM2Attention, "debug-internlm2", {"experts.output_proj_mode": "composed"})
    sep, _ = _attn(InternLM2Attention, "debug-internlm2", {"experts.output_proj_mode": "separate"})
    sep.load_state_dict(comp.state_dict())
    x, visual, pos, seg = _inputs()
    a, b = comp(x, visual, pos, seg), sep(x, visual, pos, seg)
    torch.testing.assert_close(a[~visual], b[~visual], **EXACT)  # text: wo in both modes
    assert (a[visual] - b[visual]).abs().max() > 1e-4  # visual: wo_ve(wo(o)) vs wo_ve(o)
    # composed: visual rows are exactly wo_ve applied to the text projection
    with torch.no_grad():
        comp.wo.weight.copy_(torch.eye(comp.wo.weight.shape[0], dtype=torch.float64))
        sep.wo.weight.copy_(comp.wo.weight)
    torch.testing.assert_close(comp(x, visual, pos, seg), sep(x, visual, pos, seg), **EXACT)


def test_decoder_layers_are_pre_norm_residual(flavor):
    """y = h + FFN_m(norm2(h)), h = x + Attn(norm1(x)), with the modality's SwiGLU written out."""
    from megatron_navil.reference.llm import InternLM2Layer, Qwen3Layer

    cfg = make_cfg(flavor)
    cls = InternLM2Layer if cfg.llm.backbone == "internlm2" else Qwen3Layer
    torch.manual_seed(3)
    layer = cls(cfg.llm, cfg.experts).double()
    with torch.no_grad():
        for n, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in n else 0.0))
    x, visual, pos, seg = _inputs()
    norm1, attn, norm2, ffn, ffn_ve = (
        (
            layer.attention_norm,
            layer.attention,
            layer.ffn_norm,
            layer.feed_forward,
            layer.feed_forward_ve,
        )
        if cls is InternLM2Layer
        else (
            layer.input_layernorm,
            layer.self_attn,
            layer.post_attention_layernorm,
            layer.mlp,
            layer.mlp_ve,
        )
    )

    def rms(v, w):
        return w * v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.llm.norm_eps)

    def swiglu(mlp, v):
        if cls is InternLM2Layer:
            gate, up, down = mlp.w1.weight, mlp.w3.weight, mlp.w2.weight
        else:
            gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        a = v @ gate.T
        return (a * torch.sigmoid(a) * (v @ up.T)) @ down.T

    with torch.no_grad():
        h = x + attn(rms(x, norm1.weight), visual, pos, seg)
        y = rms(h, norm2.weight)
        want = h + torch.where(visual[:, None], swiglu(ffn_ve, y), swiglu(ffn, y))
        torch.testing.assert_close(layer(x, visual, pos, seg), want, **EXACT)
