"""Model configuration: vision encoder, connector, LLM backbone, modality experts.

Names follow Megatron-Core (`hidden_size`, `num_query_groups`, `kv_channels`, `ffn_hidden_size`)
so the HF <-> Megatron conversion maps are one-to-one. Values the NaViL release does not pin
down (marked *unknown* in docs/model.md) are configurable with the defaults explained there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_navil.backbones import BACKBONE_NAMES
from megatron_navil.config.base import ConfigBase, ConfigError
from megatron_navil.config.flags import flag

# Special tokens, in the row order of the released `special_token_embedding` table. The token id
# of row i is `first_special_token_id + i` (NaViL-2B: </box> = 92544, <box> = 92545, ...).
SPECIAL_TOKENS: tuple[str, ...] = (
    "</box>",
    "<box>",
    "<IMG_CONTEXT>",
    "</img>",
    "<img>",
    "</quad>",
    "<quad>",
    "</ref>",
    "<ref>",
    "<img_uncond>",
    "<IMG_LINE_BREAK>",
    "<IMG_FRAME_BREAK>",
)
IMG_CONTEXT = "<IMG_CONTEXT>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_LINE_BREAK = "<IMG_LINE_BREAK>"
IMG_FRAME_BREAK = "<IMG_FRAME_BREAK>"


@dataclass
class VisionConfig(ConfigBase):
    """The native-resolution vision encoder (trained from scratch with the LLM)."""

    hidden_size: int = 1024
    """Encoder width C."""
    num_layers: int = 24
    """Number of encoder layers."""
    num_attention_heads: int = 16
    """Attention heads; C must be divisible by it and the head dim by 4 (2D RoPE)."""
    ffn_hidden_size: int = 4096
    """Hidden size of the GELU MLP (fc1 output)."""
    patch_size: int = 16
    """Side of a square patch in pixels (NaViL uses 16)."""
    num_channels: int = 3
    """Input image channels."""
    qkv_bias: bool = False
    """Bias on the fused qkv projection (released default: off)."""
    qk_normalization: bool = False
    """RMSNorm over the full width C (all heads together) on q and k. The released code only
    runs with it off for multi-head encoders, so released checkpoints almost surely have it off."""
    layerscale_init: float = 0.1
    """Initial value of the LayerScale vectors ls1/ls2."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon (norm1, norm2 and the optional q/k norms)."""
    rope_theta: float = 10000.0
    """Base of the 2D rotary embedding (half the rotary dims encode the row, half the column)."""
    window_size: int = 0
    """Side, in pixels, of the square attention windows of windowed layers (Qwen2.5-VL
    convention, e.g. 112 with 14 px patches); 0 disables window attention."""
    fullatt_block_indexes: tuple[int, ...] = ()
    """Layers that attend over the whole image when window attention is on."""
    keep_window_order: bool = False
    """Reproduce the released code's quirk: patches stay permuted into window order after the
    encoder, so merged tokens reach the LLM in window order. Needed to port released weights
    bit-exactly when window attention is on; a no-op without windows."""
    init_method_std: float = 0.02
    """Std of the normal init of the encoder's linear weights."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        super().validate()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision.hidden_size ({self.hidden_size}) must be divisible by "
                f"vision.num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 4:
            raise ConfigError(
                f"vision head dim {self.head_dim} must be divisible by 4 for the 2D rotary "
                "embedding (rows and columns each take half the rotary pairs)"
            )
        if self.window_size < 0 or (self.window_size and self.window_size % (2 * self.patch_size)):
            raise ConfigError(
                f"vision.window_size ({self.window_size}) must be 0 or a multiple of "
                f"2 * patch_size = {2 * self.patch_size} pixels"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(
                f"vision.fullatt_block_indexes {bad} outside 0..{self.num_layers - 1}"
            )

    def num_parameters(self) -> int:
        c, f = self.hidden_size, self.ffn_hidden_size
        per_layer = (
            2 * c  # norm1, norm2
            + 3 * c * c
            + (3 * c if self.qkv_bias else 0)  # qkv
            + (2 * c if self.qk_normalization else 0)
            + c * c
            + c  # proj
            + 2 * c  # ls1, ls2
            + c * f
            + f
            + f * c
            + c  # fc1, fc2
        )
        patch = self.num_channels * self.patch_size**2 * c + c
        return patch + self.num_layers * per_layer


@dataclass
class ConnectorConfig(ConfigBase):
    """2x2 pixel shuffle + `mlp1 = LayerNorm(4C) -> Linear(4C, D) -> GELU -> Linear(D, D)`."""

    merge_size: int = 2
    """Side of the square block of patches merged into one LLM token (downsample_ratio 0.5)."""
    layernorm_eps: float = 1e-5
    """Epsilon of mlp1's LayerNorm (torch default, as in the release)."""


@dataclass
class LLMConfig(ConfigBase):
    """The language model backbone (InternLM2-style for 2B, Qwen3-style for 9B)."""

    backbone: Literal[BACKBONE_NAMES] = "internlm2"
    """The LLM family (megatron_navil/backbones): HF key names, q/k/v layout, its defaults."""
    num_layers: int = flag(24, "--num-layers")
    """Decoder layers."""
    hidden_size: int = flag(2048, "--hidden-size")
    """Model width D."""
    ffn_hidden_size: int = flag(8192, "--ffn-hidden-size")
    """SwiGLU intermediate size."""
    num_attention_heads: int = flag(16, "--num-attention-heads")
    """Query heads."""
    num_query_groups: int = flag(8, "--num-query-groups")
    """Key/value heads (GQA groups)."""
    kv_channels: int = flag(128, "--kv-channels")
    """Head dimension."""
    qk_layernorm: bool = flag(False, "--qk-layernorm")
    """Per-head RMSNorm on q and k (Qwen3); per modality when attention experts are on."""
    vocab_size: int = 92556
    """Rows of the HF embedding table (base vocab + special tokens). Megatron pads it for TP
    divisibility; padded rows never get probability mass (their logits are masked)."""
    first_special_token_id: int = 92544
    """Token id of `</box>`, the first special token; the others follow in SPECIAL_TOKENS order."""
    rope_theta: float = flag(1_000_000.0, "--rotary-base")
    """Base of the 1D rotary embedding (the base models use 1e6; NaViL's value is unknown)."""
    norm_eps: float = flag(1e-5, "--norm-epsilon")
    """RMSNorm epsilon (InternLM2 1e-5, Qwen3 1e-6)."""
    max_sequence_length: int = 8192
    """Longest packed sequence (tokens per micro-batch pack) the model accepts."""
    init_method_std: float = 0.02
    """Std of the normal init of freshly initialised LLM weights."""
    make_vocab_size_divisible_by: int = flag(128, "--make-vocab-size-divisible-by")
    """The vocab is padded to a multiple of this (TP-independent, so checkpoints reshard)."""

    def validate(self) -> None:
        super().validate()
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"llm.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"llm.num_query_groups ({self.num_query_groups})"
            )
        if self.kv_channels % 2:
            raise ConfigError(f"llm.kv_channels ({self.kv_channels}) must be even for RoPE")
        last = self.first_special_token_id + len(SPECIAL_TOKENS) - 1
        if self.first_special_token_id < 0 or last >= self.vocab_size:
            raise ConfigError(
                f"special token ids {self.first_special_token_id}..{last} do not fit in "
                f"llm.vocab_size = {self.vocab_size}; raise vocab_size or lower "
                "first_special_token_id"
            )

    def num_parameters(self, experts: Optional["ExpertConfig"] = None) -> tuple[int, int]:
        """(total, activated-per-token) parameter counts including embeddings and LM head."""
        d, f = self.hidden_size, self.ffn_hidden_size
        q = self.num_attention_heads * self.kv_channels
        kv = self.num_query_groups * self.kv_channels
        attn = d * (q + 2 * kv) + q * d + (2 * self.kv_channels if self.qk_layernorm else 0)
        ffn = 3 * d * f
        active = self.num_layers * (attn + ffn + 2 * d) + 2 * self.vocab_size * d + d
        extra = 0
        if experts is not None:
            extra += self.num_layers * (attn if experts.attention_experts else 0)
            extra += self.num_layers * (ffn if experts.ffn_experts else 0)
        return active + extra, active


@dataclass
class ExpertConfig(ConfigBase):
    """Modality-specific experts (MHA-MMoE and FFN-MMoE): a fixed routing mask, no router."""

    attention_experts: bool = True
    """Visual tokens get their own QKV and output projections (and q/k norms when present)."""
    ffn_experts: bool = True
    """Visual tokens get their own SwiGLU FFN (an expert of Megatron's MoE layer)."""
    output_proj_mode: Literal["separate", "composed"] = "separate"
    """`separate`: visual tokens use wo_ve only (9B). `composed`: visual tokens get wo_ve(wo(x))
    (the released 2B/InternLM2 code)."""
    visual_init: Literal["copy", "random"] = "copy"
    """How `llm-to-navil` initialises visual experts: copies of the text weights (upcycling) or
    fresh random weights. Unknown in the paper."""


@dataclass
class NaViLModelConfig(ConfigBase):
    """The whole model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision encoder."""
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    """Vision -> LLM connector."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """Language model backbone."""
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    """Modality experts."""
    min_dynamic_patch: int = 256
    """Fewest patches an image is resized to (min_pixels / P^2)."""
    max_dynamic_patch: int = 24576
    """Most patches an image is resized to (max_pixels / P^2)."""
    scale_downsample_ratio: float = 0.7071
    """Side ratio between consecutive scales of the multi-scale pyramid."""
    template: str = "internlm2-chat"
    """Chat template name written to the HF config (internlm2-chat or qwen3-chat)."""

    def validate(self) -> None:
        super().validate()
        if self.vision.num_layers < 1 or self.llm.num_layers < 1:
            raise ConfigError("vision.num_layers and llm.num_layers must be >= 1")
        if self.min_dynamic_patch > self.max_dynamic_patch:
            raise ConfigError(
                f"min_dynamic_patch ({self.min_dynamic_patch}) > max_dynamic_patch "
                f"({self.max_dynamic_patch})"
            )

    # Special-token ids -------------------------------------------------------------
    def special_token_id(self, token: str) -> int:
        return self.llm.first_special_token_id + SPECIAL_TOKENS.index(token)

    @property
    def img_context_id(self) -> int:
        return self.special_token_id(IMG_CONTEXT)

    @property
    def img_start_id(self) -> int:
        return self.special_token_id(IMG_START)

    def visual_token_mask(self, tokens):
        """True where a token goes to the visual experts: <IMG_CONTEXT> and <img> (the released
        model's rule). Elementwise on a torch tensor or a numpy array. The one implementation
        the loader, the model and the FLOP count share (the reference model keeps its own: it
        is the test oracle)."""
        return (tokens == self.img_context_id) | (tokens == self.img_start_id)

    def num_parameters(self) -> tuple[int, int]:
        """(total, activated) parameters of the whole model, vision side included."""
        c4 = self.vision.hidden_size * self.connector.merge_size**2
        d = self.llm.hidden_size
        connector = 2 * c4 + c4 * d + d + d * d + d
        total, active = self.llm.num_parameters(self.experts)
        extra = self.vision.num_parameters() + connector + len(SPECIAL_TOKENS) * d
        return total + extra, active + extra


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """Vocab rows Megatron allocates: a multiple of `divisible_by`, independent of TP, so a
    checkpoint saved at one TP size loads at any other (Megatron-LM pads by divisible_by * TP,
    which makes embedding shapes depend on the layout)."""
    padded = -(-vocab_size // divisible_by) * divisible_by
    if padded % tp:
        raise ValueError(
            f"padded vocab {padded} (llm.make_vocab_size_divisible_by = {divisible_by}) is not "
            f"divisible by TP = {tp}; use a power-of-two TP size or a larger divisible_by"
        )
    return padded
