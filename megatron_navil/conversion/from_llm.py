"""llm-to-navil: the first NaViL checkpoint, initialised from a pretrained HF LLM.

The LLM is presented as a *virtual* HF NaViL source (same names and layouts as a released
NaViL directory), so the standard streaming HF -> Megatron writer does the rest:

| NaViL HF tensor                          | from                                               |
|------------------------------------------|----------------------------------------------------|
| `language_model.<text weight>`           | the LLM tensor of the same name (minus the prefix) |
| `language_model.<..._ve...>`             | a copy of its text counterpart (`--visual-experts copy`, default) or fresh |
| token embedding / LM head                | the LLM's rows; rows added for special tokens = the mean row (Hugging Face's `resize_token_embeddings` default), so new tokens start with an average logit |
| `special_token_embedding` [12, D]        | mean embedding row + N(0, std) per row (distinct, LLM-scaled) |
| `vision_model.*`, `mlp1.*`               | fresh, by Megatron's init rules for the flavor (below) |

Fresh tensors follow what the Megatron model's own initialisation does (so llm-to-navil output
is what a freshly built model would hold outside the LLM): linear weights N(0, std), output
projections (attention proj, fc2 / down) N(0, std / sqrt(2 * layers)), biases 0, norms 1,
LayerScale = layerscale_init. Each tensor draws from its own generator seeded by (seed, name),
so results do not depend on write order. Only one tensor is materialised at a time.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Optional

import torch

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.conversion.hf_llm import HFLLM, IGNORED_SUFFIXES
from megatron_navil.conversion.plan import hf_shapes

_VE = re.compile(r"_ve(?=\.|$)")
_SCALED = re.compile(
    r"(attn\.proj|mlp\.fc2|attention\.wo_ve|o_proj_ve|feed_forward_ve\.w2|mlp_ve\.down_proj)\.weight$"
)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def fresh_tensor(name: str, shape: tuple, cfg: NaViLModelConfig, seed: int) -> torch.Tensor:
    """A freshly initialised HF-layout tensor, by the Megatron model's init rules."""
    vision = name.startswith(("vision_model.", "mlp1."))
    std = cfg.vision.init_method_std if vision else cfg.llm.init_method_std
    layers = cfg.vision.num_layers if name.startswith("vision_model.") else cfg.llm.num_layers
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("ls1", "ls2"):
        return torch.full(shape, cfg.vision.layerscale_init)
    if leaf == "bias":
        return torch.zeros(shape)
    if len(shape) == 1:  # RMSNorm / LayerNorm scales (and the q/k norms)
        return torch.ones(shape)
    if _SCALED.search(name):
        std = std / math.sqrt(2.0 * layers)
    return torch.empty(shape).normal_(0.0, std, generator=_generator(seed, name))


class LLMAsNaViLSource:
    """The HF NaViL tensors of a model initialised from `llm` (see the module docstring)."""

    def __init__(
        self,
        llm: HFLLM,
        cfg: NaViLModelConfig,
        visual_experts: str = "copy",
        seed: int = 0,
        dtype: Optional[torch.dtype] = None,
    ):
        if visual_experts not in ("copy", "random"):
            raise ConversionError(
                f"--visual-experts must be copy or random, got {visual_experts!r}"
            )
        self.llm, self.cfg, self.visual, self.seed = llm, cfg, visual_experts, seed
        self.shapes = hf_shapes(cfg)
        self.dtype = dtype or llm.weights.info(llm.embed_key)[1]
        self._mean: Optional[torch.Tensor] = None
        names = llm.family.names
        self.rows_from = {
            "language_model." + names.embed: llm.embed_key,
            "language_model." + names.head: llm.head_key,
        }
        used = {self._text_name(n) for n in self.shapes if n.startswith("language_model.")}
        used.discard(None)
        have = {n for n in llm.weights.names() if not n.endswith(IGNORED_SUFFIXES)}
        if llm.tied:
            have.discard(names.head)
        self._check(used, have)

    def _check(self, used: set, have: set) -> None:
        missing, extra = sorted(used - have), sorted(have - used)
        if missing:
            raise ConversionError(
                f"{self.llm.dir} lacks {', '.join(missing[:6])} (needed by a "
                f"{self.cfg.llm.num_layers}-layer {self.llm.family.display_name} LLM)"
            )
        if extra:
            raise ConversionError(
                f"{self.llm.dir} holds {', '.join(extra[:6])}, which llm-to-navil "
                "does not map; is config.json consistent with the weights?"
            )
        for navil_name in self.shapes:
            name = self._text_name(navil_name) if navil_name.startswith("language_model.") else None
            if name is None:
                continue
            want, got = self.shapes[navil_name], tuple(self.llm.weights.info(name)[0])
            # Embedding and LM head may gain rows (special tokens); everything else is exact.
            ok = got == want or (
                navil_name in self.rows_from and got[1:] == want[1:] and got[0] <= want[0]
            )
            if not ok:
                raise ConversionError(
                    f"{self.llm.dir}: {name} has shape {list(got)}, config.json "
                    f"implies {list(want)}"
                )

    def _text_name(self, name: str) -> Optional[str]:
        """LLM tensor behind a `language_model.*` NaViL name (None: not from the LLM)."""
        if name in self.rows_from:
            return self.rows_from[name]
        if _VE.search(name) and self.visual == "random":
            return None
        return _VE.sub("", name[len("language_model.") :])

    # ---------------------------------------------------------------- Source protocol
    def names(self) -> list[str]:
        return list(self.shapes)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self.shapes[name], self.dtype

    def describe(self) -> str:
        return f"{self.llm.dir} (as NaViL)"

    def load(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name == "special_token_embedding.weight":
            noise = fresh_tensor("special_token_embedding.noise", shape, self.cfg, self.seed)
            return (self._mean_row()[None, :] + noise).to(self.dtype)
        if not name.startswith("language_model.") or self._text_name(name) is None:
            return fresh_tensor(name, shape, self.cfg, self.seed).to(self.dtype)
        t = self.llm.weights.load(self._text_name(name)).to(self.dtype)
        if name in self.rows_from and t.shape[0] < shape[0]:
            mean = self._mean_row() if self.rows_from[name] == self.llm.embed_key else _row_mean(t)
            t = torch.cat([t, mean.to(self.dtype).expand(shape[0] - t.shape[0], -1)])
        return t

    def _mean_row(self) -> torch.Tensor:
        if self._mean is None:
            self._mean = _row_mean(self.llm.weights.load(self.llm.embed_key))
        return self._mean


def _row_mean(t: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Mean row in float32, in blocks (no float32 copy of a large table)."""
    acc = torch.zeros(t.shape[1], dtype=torch.float64)
    for i in range(0, t.shape[0], block):
        acc += t[i : i + block].to(torch.float64).sum(0)
    return (acc / t.shape[0]).to(torch.float32)


def llm_to_navil(
    llm_dir: Path,
    flavor: NaViLModelConfig,
    output: Path,
    *,
    first_special_token_id: Optional[int] = None,
    visual_experts: Optional[str] = None,
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
    parallel=None,
    overwrite: bool = False,
    progress: bool = False,
    trust_pickle: bool = False,
):
    """Write the first NaViL Megatron checkpoint at `output`; returns (config, report).
    `trust_pickle`: read `pytorch_model*.bin` when the LLM has no safetensors (hf_weights.py)."""
    import dataclasses

    from megatron_navil.config.base import ConfigError
    from megatron_navil.conversion.hf_llm import navil_config_for, read_hf_llm
    from megatron_navil.conversion.to_megatron import write_megatron_checkpoint

    llm = read_hf_llm(llm_dir, trust_pickle)
    cfg = navil_config_for(llm, flavor, first_special_token_id)
    if visual_experts is not None:
        cfg = dataclasses.replace(
            cfg, experts=dataclasses.replace(cfg.experts, visual_init=visual_experts)
        )
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConversionError(f"the LLM in {llm_dir} does not fit the flavor: {e}") from None
    source = LLMAsNaViLSource(llm, cfg, cfg.experts.visual_init, seed, dtype)
    report = write_megatron_checkpoint(
        source,
        cfg,
        output,
        dtype=source.dtype,
        parallel=parallel,
        tokenizer_dir=Path(llm_dir),
        extra_metadata={"initialised_from_llm": str(llm_dir), "seed": seed},
        overwrite=overwrite,
        progress=progress,
    )
    return cfg, report
