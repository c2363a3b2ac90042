"""DataConfig: everything the training and validation loaders need besides the model config.

The trainer fills it from YAML/CLI (the same ConfigBase machinery as the model config) and hands
it to `megatron_navil.data.loader.build_train_loader` / `build_valid_loader`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from megatron_navil.config.base import ConfigBase, ConfigError
from megatron_navil.config.model import NaViLModelConfig


@dataclass
class DataConfig(ConfigBase):
    """Training/validation data: which shards, how samples become packed micro-batches."""

    train_paths: tuple[str, ...] = ()
    """Dataset directories written by navil-preprocess (each holds a manifest.json)."""
    train_weights: tuple[float, ...] = ()
    """Blend weight per train path (normalised to sum 1). Empty = natural proportions (every
    sample once per epoch). Dataset i contributes round(samples_per_epoch * w_i) samples per
    epoch: fewer than it has = a fresh random subset each epoch, more = repeated."""
    valid_paths: tuple[str, ...] = ()
    """Held-out dataset directories for the validation loader (read in file order, no shuffle)."""
    samples_per_epoch: Optional[int] = None
    """Samples in one blended epoch; None = the sum of the train datasets' sizes."""
    seq_length: int = 4096
    """Tokens per packed micro-batch (T); every pack is padded to exactly this length."""
    pad_multiple: int = 16
    """seq_length must be a multiple of this: the FP8 recipe's row multiple (16; 32 for MXFP8),
    times the TP size under sequence parallelism (see `pad_multiple_for`)."""
    seed: int = 1234
    """Seed of the epoch shuffles and the blend draws (same seed = same batches)."""
    shuffle: bool = True
    """Shuffle the training samples every epoch (the validation loader never shuffles)."""
    max_images_per_pack: int = 64
    """Most images one micro-batch may hold (bounds the decode batch and ViT memory). A sample
    with more images than this is skipped and counted."""
    multiscale: bool = False
    """Feed every image as NaViL's multi-scale pyramid (ratio scale_downsample_ratio, smallest
    scale first) instead of the single largest scale. About doubles the image tokens."""
    min_dynamic_patch: Optional[int] = None
    """Fewest 16 px patches an image is resized to; None = the model config's value."""
    max_dynamic_patch: Optional[int] = None
    """Most 16 px patches an image is resized to; None = the model config's value."""
    overlong_policy: Literal["truncate", "skip"] = "truncate"
    """A sample longer than seq_length: `truncate` keeps its first seq_length tokens (cut before
    an image that would straddle the cut; it gets a pack of its own), `skip` drops it. Both are
    counted (truncated_samples / skipped_samples)."""
    chat_style: Optional[Literal["internlm2", "qwen3"]] = None
    """Chat template for conversations; None = from the model config's `template`."""
    add_bos: Optional[bool] = None
    """Start caption/text/interleaved samples with the tokenizer's BOS; None = as the chat style
    does (internlm2: yes, qwen3: no)."""
    pack_window: int = 8
    """Open packs the planner keeps while filling (best fit among them); more = less padding,
    slower planning."""
    plan_chunk_samples: int = 65536
    """The planner packs the epoch order in independent chunks of this many samples, so a
    restored loader re-plans one chunk, not the whole epoch."""
    prefetch_depth: int = 2
    """Micro-batches a background thread prepares ahead; the loader holds at most this + 1."""
    num_decode_threads: int = 4
    """DALI worker threads (CPU decode/resize; host-side work of the GPU path)."""
    decode_device: Literal["auto", "cpu", "gpu"] = "auto"
    """`gpu`: DALI `mixed` decoder + GPU resize (pixel_values stay on the GPU); `cpu`: DALI CPU
    operators; `auto`: gpu when CUDA is available."""
    pixel_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of pixel_values in the batches."""
    recount_tokens: bool = True
    """When a dataset's index counted text tokens with another tokenizer (manifest hash differs)
    or chat style, recount them from the samples' JSON at start-up (slow on big data; logged).
    False refuses such a dataset with a message instead."""
    max_image_pixels: Optional[int] = None
    """Decompression-bomb guard: an image with more pixels than this (from the index, and from
    its own header before decoding) is not decoded; its sample is skipped and counted. None =
    16 x the model's largest resized image (max_dynamic_patch x patch_size^2): 100.7 MP for the
    released configs, navil-preprocess's default limit; 4.2 MP for the debug flavors."""

    def validate(self) -> None:
        super().validate()
        if self.seq_length <= 0 or self.pad_multiple <= 0:
            raise ConfigError("data.seq_length and data.pad_multiple must be positive")
        if self.seq_length % self.pad_multiple:
            raise ConfigError(
                f"data.seq_length ({self.seq_length}) must be a multiple of data.pad_multiple "
                f"({self.pad_multiple}: FP8 needs 16, sequence parallel the TP size)"
            )
        if self.train_weights and len(self.train_weights) != len(self.train_paths):
            raise ConfigError(
                f"data.train_weights has {len(self.train_weights)} entries for "
                f"{len(self.train_paths)} data.train_paths; give one weight per path or none"
            )
        if any(w < 0 for w in self.train_weights) or (
            self.train_weights and sum(self.train_weights) <= 0
        ):
            raise ConfigError("data.train_weights must be >= 0 with a positive sum")
        for name in (
            "max_images_per_pack",
            "pack_window",
            "plan_chunk_samples",
            "num_decode_threads",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1")
        if self.prefetch_depth < 0:
            raise ConfigError("data.prefetch_depth must be >= 0")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError("data.samples_per_epoch must be >= 1 (or null)")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError("data.max_image_pixels must be >= 1 (or null)")

    def resolved_model_config(self, model_cfg: NaViLModelConfig) -> NaViLModelConfig:
        """The model config with this data config's min/max dynamic patch applied."""
        return model_cfg.replace(
            min_dynamic_patch=self.min_dynamic_patch or model_cfg.min_dynamic_patch,
            max_dynamic_patch=self.max_dynamic_patch or model_cfg.max_dynamic_patch,
        )

    def resolved_chat_style(self, model_cfg: NaViLModelConfig) -> str:
        if self.chat_style is not None:
            return self.chat_style
        return "qwen3" if model_cfg.template.startswith("qwen3") else "internlm2"

    def resolved_add_bos(self, model_cfg: NaViLModelConfig) -> bool:
        if self.add_bos is not None:
            return self.add_bos
        return self.resolved_chat_style(model_cfg) == "internlm2"


def pad_multiple_for(
    tensor_model_parallel_size: int = 1, sequence_parallel: bool = False, fp8_row_multiple: int = 1
) -> int:
    """Smallest multiple seq_length must honour: the FP8 recipe's row multiple (16, or 32 for
    MXFP8; 1 without FP8), and the TP size under SP."""
    m = fp8_row_multiple
    if sequence_parallel:
        m = m * tensor_model_parallel_size // math.gcd(m, tensor_model_parallel_size)
    return m
