"""DataConfig: which shards the loaders read and how samples become packed micro-batches.

The trainer fills it from YAML/CLI (the same ConfigBase machinery as the model config) and hands
it to `megatron_navil.data.loader.build_train_loader` / `build_valid_loader`, together with what
has its one home elsewhere: the sequence length and seed (`training.seq_length`,
`training.seed`, passed as arguments) and the image patch limits (the model config's
`min_dynamic_patch` / `max_dynamic_patch`). The old copies here are refused (MOVED).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

from megatron_navil.config.base import ConfigBase, ConfigError
from megatron_navil.config.flags import flag
from megatron_navil.config.model import NaViLModelConfig


def parse_data_path(words: list[str]) -> dict[str, Any]:
    """`--data-path` words -> train_paths and train_weights: ['dirA'] or Megatron-LM's weighted
    blend ['0.7', 'dirA', '0.3', 'dirB']. Without weights, train_weights is reset to ()."""
    try:
        float(words[0])
    except ValueError:
        return {"train_paths": tuple(words), "train_weights": ()}
    if len(words) % 2:
        raise ConfigError(f"--data-path with weights needs 'weight path' pairs, got {words}")
    try:
        weights = tuple(float(w) for w in words[0::2])
    except ValueError:
        raise ConfigError(
            f"--data-path with weights needs 'weight path' pairs, got {words}"
        ) from None
    return {"train_paths": tuple(words[1::2]), "train_weights": weights}


@dataclass
class DataConfig(ConfigBase):
    """Training/validation data: which shards, how samples become packed micro-batches."""

    MOVED: ClassVar[dict[str, str]] = {
        "seq_length": "set training.seq_length (--seq-length)",
        "seed": "set training.seed (--seed)",
        "pad_multiple": "it follows from the parallel layout and the FP8 recipe "
        "(parallel.sequence_parallel, precision.fp8, precision.fp8_padding_multiple)",
        "min_dynamic_patch": "set model.min_dynamic_patch (the model config)",
        "max_dynamic_patch": "set model.max_dynamic_patch (the model config)",
    }

    train_paths: tuple[str, ...] = flag(
        (), "--data-path", expand=parse_data_path, metavar="[WEIGHT] PATH"
    )
    """Dataset directories written by navil-preprocess (each holds a manifest.json); the flag
    takes Megatron-LM's blend syntax too (`0.7 dirA 0.3 dirB` also sets train_weights)."""
    train_weights: tuple[float, ...] = ()
    """Blend weight per train path (normalised to sum 1). Empty = natural proportions (every
    sample once per epoch). Dataset i contributes round(samples_per_epoch * w_i) samples per
    epoch: fewer than it has = a fresh random subset each epoch, more = repeated."""
    valid_paths: tuple[str, ...] = flag((), "--valid-data-path", metavar="PATH")
    """Held-out dataset directories for the validation loader (read in file order, no shuffle)."""
    samples_per_epoch: Optional[int] = None
    """Samples in one blended epoch; None = the sum of the train datasets' sizes."""
    shuffle: bool = True
    """Shuffle the training samples every epoch (the validation loader never shuffles)."""
    shuffle_block_samples: int = 1024
    """The epoch shuffle moves blocks of this many consecutive samples (fewer for small
    datasets: at least 256 blocks each) and shuffles samples inside each planner chunk, so a
    chunk reads its index rows and tar members in runs instead of one page per sample. 1 = a
    per-sample permutation of the whole epoch."""
    balance_dp_ranks: bool = flag(True, "--balance-dp-ranks")
    """Deal each step's packs to the data-parallel ranks so that their model FLOPs (vision
    encoder included) are about equal, instead of round-robin (data/dealing.py). The step trains
    on the same packs either way; only which rank computes which pack changes. Needs more than
    one micro-batch per rank per step to have any effect, or balance_window_steps > 1."""
    balance_window_steps: int = flag(1, "--balance-window-steps")
    """With balance_dp_ranks: 1 keeps every pack in the step round-robin gives it (only the
    rank changes). W > 1 also moves packs between the W steps of a window: each step gets packs
    of similar cost, which is the only way to balance with 1-2 micro-batches per rank per step
    (16-64 recommended there), but steps then differ in composition (image-heavy and text-heavy
    steps, in shuffled order; every pack is still trained once per epoch)."""
    max_images_per_pack: int = 64
    """Most images one micro-batch may hold (bounds the decode batch and ViT memory). A sample
    with more images than this is skipped and counted."""
    multiscale: bool = False
    """Feed every image as NaViL's multi-scale pyramid (ratio scale_downsample_ratio, smallest
    scale first) instead of the single largest scale. About doubles the image tokens."""
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
    host_pack_metadata: bool = flag(True, "--host-pack-metadata")
    """Compute each pack's host-side metadata (segment lengths, visual token count, image
    grids, <IMG_CONTEXT>, loss and logit positions, vision RoPE angles and window order) in the
    loader thread and send it with the batch, pinned when CUDA is available, so the model's
    forward reads no device tensor on the host (megatron_navil/pack_meta.py). Off: the model
    computes the same values on the device, with host syncs; numerics are identical either way."""
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
            "shuffle_block_samples",
            "balance_window_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1")
        if self.prefetch_depth < 0:
            raise ConfigError("data.prefetch_depth must be >= 0")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError("data.samples_per_epoch must be >= 1 (or null)")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError("data.max_image_pixels must be >= 1 (or null)")

    def resolved_chat_style(self, model_cfg: NaViLModelConfig) -> str:
        if self.chat_style is not None:
            return self.chat_style
        return "qwen3" if model_cfg.template.startswith("qwen3") else "internlm2"

    def resolved_add_bos(self, model_cfg: NaViLModelConfig) -> bool:
        if self.add_bos is not None:
            return self.add_bos
        return self.resolved_chat_style(model_cfg) == "internlm2"
