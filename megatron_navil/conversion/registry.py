"""HF release <-> Megatron parameter mapping, declared as data.

Each `ParamMapping` pairs one Megatron parameter name (canonical TP=1/PP=1/EP=1 local layout;
`*` = layer index) with the HF names it is made of, a named transform (transforms.py) and the
tensor-parallel split of the Megatron tensor (column / row / vocab-parallel, SwiGLU blocks, QKV
groups). Expert parallelism needs no entry: each FFN expert is its own canonical parameter
(`local_experts.{0: text, 1: visual}`) and EP only decides which rank holds it.
`mappings(cfg)` lists them for a model config; `expand` instantiates the wildcards. Conversion
is strict: an HF or Megatron key that no mapping consumes is an error naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.conversion.transforms import (
    REPLICATED,
    GatedMLP,
    GroupedQKV,
    HeadInterleave,
    PadVocab,
    PatchEmbed,
    TPSplit,
    Transform,
)

IDENTITY = Transform()


@dataclass(frozen=True)
class ParamMapping:
    megatron: str
    """Megatron parameter name; `*` stands for the layer index."""
    hf: tuple[str, ...]
    """HF parameter name(s) the Megatron tensor is built from, same wildcard."""
    transform: Transform = IDENTITY
    """How the HF tensors become the Megatron tensor (and back)."""
    tp: TPSplit = REPLICATED
    """How the Megatron tensor is split over tensor-parallel ranks."""


def _m(
    megatron: str, *hf: str, transform: Transform = IDENTITY, tp: TPSplit = REPLICATED
) -> ParamMapping:
    return ParamMapping(megatron, tuple(hf), transform, tp)


COLUMN, ROW = TPSplit(axis=0), TPSplit(axis=1)
SWIGLU = TPSplit(axis=0, blocks=2)


def vision_mappings(cfg: NaViLModelConfig) -> list[ParamMapping]:
    v = cfg.vision
    ml, hl = "vision_model.decoder.layers.*.", "vision_model.encoder.layers.*."
    qkv = HeadInterleave(heads=v.num_attention_heads)
    per_head = TPSplit(axis=0, unit=3 * v.head_dim)  # a head's [q_h, k_h, v_h] rows stay together
    out = [
        _m(
            "vision_model.patch_embed.weight",
            "vision_model.embeddings.patch_embedding.weight",
            transform=PatchEmbed(channels=v.num_channels, patch=v.patch_size),
        ),
        _m("vision_model.patch_embed.bias", "vision_model.embeddings.patch_embedding.bias"),
        _m(ml + "input_layernorm.weight", hl + "norm1.weight"),
        _m(ml + "pre_mlp_layernorm.weight", hl + "norm2.weight"),
        _m(
            ml + "self_attention.linear_qkv.weight",
            hl + "attn.qkv.weight",
            transform=qkv,
            tp=per_head,
        ),
        _m(
            ml + "self_attention.linear_proj.weight",
            hl + "attn.proj.weight",
            tp=TPSplit(1, unit=v.head_dim),
        ),
        _m(ml + "self_attention.linear_proj.bias", hl + "attn.proj.bias"),
        _m(ml + "attn_layerscale.weight", hl + "ls1"),
        _m(ml + "mlp_layerscale.weight", hl + "ls2"),
        _m(ml + "mlp.linear_fc1.weight", hl + "mlp.fc1.weight", tp=COLUMN),
        _m(ml + "mlp.linear_fc1.bias", hl + "mlp.fc1.bias", tp=COLUMN),
        _m(ml + "mlp.linear_fc2.weight", hl + "mlp.fc2.weight", tp=ROW),
        _m(ml + "mlp.linear_fc2.bias", hl + "mlp.fc2.bias"),
    ]
    if v.qkv_bias:
        out.append(
            _m(
                ml + "self_attention.linear_qkv.bias",
                hl + "attn.qkv.bias",
                transform=qkv,
                tp=per_head,
            )
        )
    if v.qk_normalization:  # full-width norms, sharded like q and k (TPRMSNorm)
        head = TPSplit(axis=0, unit=v.head_dim)
        out += [
            _m(ml + "self_attention.q_norm.weight", hl + "attn.q_norm.weight", tp=head),
            _m(ml + "self_attention.k_norm.weight", hl + "attn.k_norm.weight", tp=head),
        ]
    return out


def connector_mappings() -> list[ParamMapping]:
    return [
        _m("connector.layernorm.weight", "mlp1.0.weight"),
        _m("connector.layernorm.bias", "mlp1.0.bias"),
        _m("connector.linear_fc1.weight", "mlp1.1.weight"),
        _m("connector.linear_fc1.bias", "mlp1.1.bias"),
        _m("connector.linear_fc2.weight", "mlp1.3.weight"),
        _m("connector.linear_fc2.bias", "mlp1.3.bias"),
    ]


def _hf_llm_names(cfg: NaViLModelConfig) -> dict[str, object]:
    """The backbone's HF names for each role (text weights; `_ve` suffixes added below)."""
    if cfg.llm.backbone == "internlm2":
        p = "language_model.model.layers.*."
        return dict(
            embed="language_model.model.tok_embeddings.weight",
            head="language_model.output.weight",
            norm="language_model.model.norm.weight",
            attn_norm=p + "attention_norm.weight",
            ffn_norm=p + "ffn_norm.weight",
            qkv=lambda ve: (f"{p}attention.wqkv{ve}.weight",),
            proj=lambda ve: f"{p}attention.wo{ve}.weight",
            qnorm=None,
            knorm=None,
            gate_up=lambda ve: (f"{p}feed_forward{ve}.w1.weight", f"{p}feed_forward{ve}.w3.weight"),
            down=lambda ve: f"{p}feed_forward{ve}.w2.weight",
        )
    p = "language_model.model.layers.*."
    return dict(
        embed="language_model.model.embed_tokens.weight",
        head="language_model.lm_head.weight",
        norm="language_model.model.norm.weight",
        attn_norm=p + "input_layernorm.weight",
        ffn_norm=p + "post_attention_layernorm.weight",
        qkv=lambda ve: tuple(f"{p}self_attn.{x}_proj{ve}.weight" for x in "qkv"),
        proj=lambda ve: f"{p}self_attn.o_proj{ve}.weight",
        qnorm=lambda ve: f"{p}self_attn.q_norm{ve}.weight",
        knorm=lambda ve: f"{p}self_attn.k_norm{ve}.weight",
        gate_up=lambda ve: (f"{p}mlp{ve}.gate_proj.weight", f"{p}mlp{ve}.up_proj.weight"),
        down=lambda ve: f"{p}mlp{ve}.down_proj.weight",
    )


def llm_mappings(cfg: NaViLModelConfig, padded_vocab: int) -> list[ParamMapping]:
    llm, experts = cfg.llm, cfg.experts
    n = _hf_llm_names(cfg)
    vocab = PadVocab(vocab=llm.vocab_size, padded=padded_vocab)
    # InternLM2's fused wqkv already has Megatron's grouped row layout.
    qkv = (
        IDENTITY
        if llm.backbone == "internlm2"
        else GroupedQKV(groups=llm.num_query_groups, head_dim=llm.kv_channels)
    )
    group_rows = (llm.num_attention_heads // llm.num_query_groups + 2) * llm.kv_channels
    qkv_tp, proj_tp = TPSplit(axis=0, unit=group_rows), TPSplit(axis=1, unit=llm.kv_channels)
    ml = "language_model.decoder.layers.*."
    out = [
        _m("language_model.embedding.weight", n["embed"], transform=vocab, tp=COLUMN),
        _m("language_model.special_token_embedding.weight", "special_token_embedding.weight"),
        _m("language_model.output_layer.weight", n["head"], transform=vocab, tp=COLUMN),
        _m("language_model.decoder.final_layernorm.weight", n["norm"]),
        _m(ml + "input_layernorm.weight", n["attn_norm"]),
        _m(ml + "pre_mlp_layernorm.weight", n["ffn_norm"]),
    ]
    modalities = [("text", ""), ("visual", "_ve")] if experts.attention_experts else [(None, "")]
    for name, ve in modalities:
        sub = f".{name}" if name else ""
        out.append(
            _m(
                f"{ml}self_attention.linear_qkv{sub}.weight",
                *n["qkv"](ve),
                transform=qkv,
                tp=qkv_tp,
            )
        )
        out.append(_m(f"{ml}self_attention.linear_proj{sub}.weight", n["proj"](ve), tp=proj_tp))
        if llm.qk_layernorm:
            out.append(_m(f"{ml}self_attention.q_layernorm{sub}.weight", n["qnorm"](ve)))
            out.append(_m(f"{ml}self_attention.k_layernorm{sub}.weight", n["knorm"](ve)))
    ffn = (
        [(f"{ml}mlp.experts.local_experts.{i}.", ve) for i, ve in enumerate(["", "_ve"])]
        if experts.ffn_experts
        else [(f"{ml}mlp.", "")]
    )
    for prefix, ve in ffn:
        out.append(
            _m(prefix + "linear_fc1.weight", *n["gate_up"](ve), transform=GatedMLP(), tp=SWIGLU)
        )
        out.append(_m(prefix + "linear_fc2.weight", n["down"](ve), tp=ROW))
    return out


def mappings(cfg: NaViLModelConfig, padded_vocab: int) -> list[ParamMapping]:
    """Every parameter of the model, with wildcards."""
    return vision_mappings(cfg) + connector_mappings() + llm_mappings(cfg, padded_vocab)


def expand(mapping: ParamMapping, cfg: NaViLModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Concrete (megatron, hf names) pairs of one mapping (one per layer for `*`)."""
    if "*" not in mapping.megatron:
        return [(mapping.megatron, mapping.hf)]
    layers = (
        cfg.vision.num_layers if mapping.megatron.startswith("vision_model") else cfg.llm.num_layers
    )
    return [
        (mapping.megatron.replace("*", str(i)), tuple(h.replace("*", str(i)) for h in mapping.hf))
        for i in range(layers)
    ]
