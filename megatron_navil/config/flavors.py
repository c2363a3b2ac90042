"""Named model flavors and the joint vision/LLM scaling-law helper.

- `debug-internlm2`, `debug-qwen3`: tiny models (one per backbone layout) whose CPU
  forward/backward takes well under a second; used by the tests and the quickstart.
- `navil-2b`, `navil-9b`: the published LLM shapes. The released ViT sizes are unknown; we pick
  encoders near the paper's ~0.6B and ~1.2B with 128-wide heads (see docs/model.md).

`propose_vision_size(llm_params)` follows the joint scaling law: the optimal encoder size grows
log-linearly with the LLM size. By default log(V) = a + b log(L) is fitted by least squares
through the paper's read-off points (0.5B -> 0.3B, 1.8B -> 0.6B, 7B -> 1.2B; b comes out near
0.5); a law fitted by `navil-scaling fit` can be passed instead (`ScalingLaw`,
megatron_navil.scaling.law.load_law).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_navil.backbones import get_backbone
from megatron_navil.config.base import ConfigError
from megatron_navil.config.model import (
    ConnectorConfig,
    ExpertConfig,
    LLMConfig,
    NaViLModelConfig,
    VisionConfig,
)

# (LLM parameters, optimal ViT parameters), in billions, read off the paper's scaling study.
SCALING_LAW_POINTS: tuple[tuple[float, float], ...] = ((0.5, 0.3), (1.8, 0.6), (7.0, 1.2))


def _debug(backbone: str) -> NaViLModelConfig:
    family = get_backbone(backbone)
    return NaViLModelConfig(
        vision=VisionConfig(
            hidden_size=32, num_layers=2, num_attention_heads=2, ffn_hidden_size=64
        ),
        connector=ConnectorConfig(),
        llm=LLMConfig(
            backbone=backbone,
            num_layers=4,
            hidden_size=64,
            ffn_hidden_size=128,
            num_attention_heads=4,
            num_query_groups=2,
            kv_channels=16,
            qk_layernorm=family.qk_layernorm,
            vocab_size=512,
            first_special_token_id=500,
            rope_theta=10000.0,
            # the base models' values (InternLM2 1e-5, Qwen3 1e-6)
            norm_eps=1e-5 if backbone == "internlm2" else 1e-6,
            max_sequence_length=2048,
            make_vocab_size_divisible_by=8,
        ),
        experts=ExpertConfig(output_proj_mode=family.output_proj_mode),
        # Small images keep the debug model fast: 16..1024 patches of 16 px.
        min_dynamic_patch=16,
        max_dynamic_patch=1024,
        template=family.template,
    )


def _navil_2b() -> NaViLModelConfig:
    return NaViLModelConfig(
        # 21 x 28.3M + patch embed = 0.595B parameters.
        vision=VisionConfig(
            hidden_size=1536, num_layers=21, num_attention_heads=12, ffn_hidden_size=6144
        ),
        llm=LLMConfig(
            backbone="internlm2",
            num_layers=24,
            hidden_size=2048,
            ffn_hidden_size=8192,
            num_attention_heads=16,
            num_query_groups=8,
            kv_channels=128,
            qk_layernorm=False,
            vocab_size=92544 + 12,
            first_special_token_id=92544,
            norm_eps=1e-5,
        ),
        experts=ExpertConfig(output_proj_mode="composed"),
        template="internlm2-chat",
    )


def _navil_9b() -> NaViLModelConfig:
    return NaViLModelConfig(
        # 24 x 50.3M + patch embed = 1.21B parameters.
        vision=VisionConfig(
            hidden_size=2048, num_layers=24, num_attention_heads=16, ffn_hidden_size=8192
        ),
        llm=LLMConfig(
            backbone="qwen3",
            num_layers=36,
            hidden_size=4096,
            ffn_hidden_size=12288,
            num_attention_heads=32,
            num_query_groups=8,
            kv_channels=128,
            qk_layernorm=True,
            # Qwen3's embedding has 151936 rows (tokenizer 151669 + padding); the special
            # tokens are appended after the tokenizer's own tokens, inside those rows.
            vocab_size=151936,
            first_special_token_id=151669,
            norm_eps=1e-6,
        ),
        experts=ExpertConfig(output_proj_mode="separate"),
        template="qwen3-chat",
    )


FLAVORS: dict[str, Callable[[], NaViLModelConfig]] = {
    "debug-internlm2": lambda: _debug("internlm2"),
    "debug-qwen3": lambda: _debug("qwen3"),
    "navil-2b": _navil_2b,
    "navil-9b": _navil_9b,
}


def get_flavor(name: str) -> NaViLModelConfig:
    """A fresh, validated config of the named flavor."""
    if name not in FLAVORS:
        raise ConfigError(f"unknown model flavor {name!r}; choose one of {', '.join(FLAVORS)}")
    cfg = FLAVORS[name]()
    cfg.validate()
    return cfg


@dataclass(frozen=True)
class ScalingLaw:
    """The joint vision/LLM law log(V_opt) = a + b log(L), sizes in billions of parameters.

    The built-in one is fitted through the paper's read-off points (`PAPER_LAW`);
    `megatron_navil.scaling.law.load_law` reads one that `navil-scaling fit` wrote."""

    a: float
    """Intercept (natural log of billions)."""
    b: float
    """Slope: V_opt grows as L^b."""
    llm_range: tuple[float, float]
    """Smallest and largest LLM size (billions) the law was fitted on: outside it, it
    extrapolates."""
    source: str = "paper"
    """Where the coefficients come from (`paper`, or the fitted JSON's path)."""

    @classmethod
    def from_points(cls, points, source: str = "paper") -> "ScalingLaw":
        """Least squares through (L, V_opt) pairs (billions), in log-log space."""
        xs = [math.log(llm) for llm, _ in points]
        ys = [math.log(v) for _, v in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        llms = [llm for llm, _ in points]
        return cls(my - b * mx, b, (min(llms), max(llms)), source)

    def vision_size(self, llm_params_billion: float) -> float:
        """V_opt (billions) for an LLM of the given size (billions)."""
        if llm_params_billion <= 0:
            raise ConfigError(f"LLM size must be positive, got {llm_params_billion}")
        return math.exp(self.a + self.b * math.log(llm_params_billion))

    def extrapolates(self, llm_params_billion: float) -> bool:
        """True when the LLM size lies outside the sizes the law was fitted on."""
        lo, hi = self.llm_range
        return not lo <= llm_params_billion <= hi


PAPER_LAW = ScalingLaw.from_points(SCALING_LAW_POINTS)
"""The law through the paper's read-off points (b near 0.5)."""


def propose_vision_size(llm_params_billion: float, law: Optional[ScalingLaw] = None) -> float:
    """Optimal encoder size (billions of parameters) for an LLM of the given size (billions),
    by `law` (default: the paper's points). Callers say when `law.extrapolates(...)`."""
    return (law or PAPER_LAW).vision_size(llm_params_billion)


def propose_vision_config(
    llm_params_billion: float, head_dim: int = 128, law: Optional[ScalingLaw] = None
) -> VisionConfig:
    """A VisionConfig near the scaling-law size: FFN = 4x width, heads of `head_dim`.

    Depth and width barely matter at a fixed budget (paper finding 3), so we pick the width whose
    depth lands closest to 24 layers, the depth of the paper's mid-size encoders. Widths are
    multiples of 4 heads, so the encoder splits over TP = 1, 2 or 4.
    """
    target = propose_vision_size(llm_params_billion, law) * 1e9
    best = None
    for width in range(4 * head_dim, 8192 + 1, 4 * head_dim):
        per_layer = VisionConfig(
            hidden_size=width,
            num_layers=1,
            num_attention_heads=width // head_dim,
            ffn_hidden_size=4 * width,
        ).num_parameters()
        depth = max(1, round(target / per_layer))
        score = abs(math.log(depth / 24)) + abs(math.log(depth * per_layer / target))
        if best is None or score < best[0]:
            best = (score, width, depth)
    _, width, depth = best
    return VisionConfig(
        hidden_size=width,
        num_layers=depth,
        num_attention_heads=width // head_dim,
        ffn_hidden_size=4 * width,
    )
