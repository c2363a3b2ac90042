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

from megatron_navil.backbones import expert_name, get_backbone
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.conversion.errors import ConversionError
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


_RELEASE_LLM = "language_model."
"""Prefix of the LLM's parameters in the NaViL release (the family's own names follow it)."""


def _qkv_transform(cfg: NaViLModelConfig) -> Transform:
    """How the family's stored q/k/v become Megatron's grouped rows (backbones.QKVLayout)."""
    llm, layout = cfg.llm, get_backbone(cfg.llm.backbone).qkv_layout
    if layout == "fused_grouped":  # already Megatron's grouped row layout
        return IDENTITY
    if layout == "separate":
        return GroupedQKV(groups=llm.num_query_groups, head_dim=llm.kv_channels)
    raise ConversionError(f"no q/k/v transform for the layout {layout!r}")


def llm_mappings(cfg: NaViLModelConfig, padded_vocab: int) -> list[ParamMapping]:
    llm, experts = cfg.llm, cfg.experts
    n = get_backbone(llm.backbone).names

    def hf(name: str, visual: bool = False) -> str:
        return _RELEASE_LLM + expert_name(name, visual)

    vocab = PadVocab(vocab=llm.vocab_size, padded=padded_vocab)
    qkv = _qkv_transform(cfg)
    group_rows = (llm.num_attention_heads // llm.num_query_groups + 2) * llm.kv_channels
    qkv_tp, proj_tp = TPSplit(axis=0, unit=group_rows), TPSplit(axis=1, unit=llm.kv_channels)
    ml = "language_model.decoder.layers.*."
    out = [
        _m("language_model.embedding.weight", hf(n.embed), transform=vocab, tp=COLUMN),
        _m("language_model.special_token_embedding.weight", "special_token_embedding.weight"),
        _m("language_model.output_layer.weight", hf(n.head), transform=vocab, tp=COLUMN),
        _m("language_model.decoder.final_layernorm.weight", hf(n.final_norm)),
        _m(ml + "input_layernorm.weight", hf(n.attn_norm)),
        _m(ml + "pre_mlp_layernorm.weight", hf(n.ffn_norm)),
    ]
    modalities = (
        [("text", False), ("visual", True)] if experts.attention_experts else [(None, False)]
    )
    for name, ve in modalities:
        sub = f".{name}" if name else ""
        qkv_hf = tuple(hf(x, ve) for x in n.qkv)
        out.append(
            _m(f"{ml}self_attention.linear_qkv{sub}.weight", *qkv_hf, transform=qkv, tp=qkv_tp)
        )
        out.append(_m(f"{ml}self_attention.linear_proj{sub}.weight", hf(n.proj, ve), tp=proj_tp))
        if llm.qk_layernorm:
            if n.q_norm is None or n.k_norm is None:
                raise ConversionError(
                    f"llm.qk_layernorm is on, but {llm.backbone} checkpoints have no q/k norm"
                )
            out.append(_m(f"{ml}self_attention.q_layernorm{sub}.weight", hf(n.q_norm, ve)))
            out.append(_m(f"{ml}self_attention.k_layernorm{sub}.weight", hf(n.k_norm, ve)))
    ffn = (
        [(f"{ml}mlp.experts.local_experts.{i}.", ve) for i, ve in enumerate([False, True])]
        if experts.ffn_experts
        else [(f"{ml}mlp.", False)]
    )
    for prefix, ve in ffn:
        gate_up = tuple(hf(x, ve) for x in n.gate_up)
        out.append(_m(prefix + "linear_fc1.weight", *gate_up, transform=GatedMLP(), tp=SWIGLU))
        out.append(_m(prefix + "linear_fc2.weight", hf(n.down, ve), tp=ROW))
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
