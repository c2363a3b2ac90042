"""Whether a checkpoint's recorded model config fits the model a run builds.

Only fields that change parameter shapes or names refuse a load; fields that change behaviour
or data handling (init, RoPE base, window layout, dynamic-patch limits) may differ, so a run can
change them between stages.
"""

from __future__ import annotations

from pathlib import Path

from megatron_navil.checkpoint.format import CheckpointError
from megatron_navil.config.model import NaViLModelConfig

# Fields that change behaviour or data handling but not parameter shapes.
_NON_SHAPE_FIELDS = {
    "init_method_std",
    "visual_init",
    "max_sequence_length",
    "rope_theta",
    "template",
    "min_dynamic_patch",
    "max_dynamic_patch",
    "scale_downsample_ratio",
    "layerscale_init",
    "norm_eps",
    "layernorm_eps",
    "keep_window_order",
    "window_size",
    "fullatt_block_indexes",
}


def model_config_diffs(saved: dict, current: NaViLModelConfig) -> list[str]:
    """`field: checkpoint X vs config Y` for every shape-relevant field that differs."""
    diffs = []

    def walk(a, b, prefix):
        for k in sorted(set(a) | set(b)):
            va, vb = a.get(k), b.get(k)
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, f"{prefix}{k}.")
            elif va != vb and k not in _NON_SHAPE_FIELDS:
                diffs.append(f"{prefix}{k}: checkpoint {va!r} vs config {vb!r}")

    walk(saved, current.to_dict(), "")
    return diffs


def check_model_config(saved: dict, current: NaViLModelConfig, path: Path) -> None:
    """Refuse a checkpoint of another model shape, naming the fields that differ."""
    diffs = model_config_diffs(saved, current)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was saved for a different model:\n  "
            + "\n  ".join(diffs)
            + "\nuse the matching --model config / flavor, or convert the checkpoint"
        )
