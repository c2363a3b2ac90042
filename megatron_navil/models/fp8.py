"""FP8 policy of the model: which recipe this device can run, and scaling state that stays
consistent whatever mix of packs the ranks get.

Device support (Transformer Engine 2.11, `transformer_engine/pytorch/quantization.py`):
- delayed / tensorwise (per-tensor scales): compute capability >= 8.9 (Ada needs CUDA >= 12.1);
- blockwise (Float8BlockScaling): compute capability >= 9.0 and CUDA >= 12.9;
- mxfp8 (MXFP8BlockScaling): compute capability 10.x or 11.x (Blackwell; not yet on 12.x).
Refusing here gives one clear message at model construction instead of TE's assertion at the
first forward.

Consistency across ranks (delayed scaling): TE keeps one global amax buffer per (recipe, amax
group); every FP8 module joins it the first time it runs, and every outermost `fp8_autocast`
exit all-reduces the concatenated buffer over the group. Data-parallel ranks see different packs
(a text-only pack skips the vision encoder), so with Megatron's default group (TP x DP) they would
join in different orders and reduce different numbers of times: a hang, or amaxes of one module
scaled by another's. We reduce amax over the tensor-parallel group only (Megatron's
`tp_only_amax_red`): TP ranks share the pack, so they execute the same FP8 modules in the same
order; each DP rank keeps its own scales, which only ever quantize its own activations. Inside
the LLM every modality GEMM also runs on every micro-batch (ModalityRouting gives an absent
modality a block of zero rows), so the set of FP8 modules does not depend on the pack either.
"""

from __future__ import annotations

from typing import Optional

from megatron_navil.config.base import ConfigError

_NEEDS = {
    "delayed": "compute capability 8.9 or newer (Ada, Hopper, Blackwell)",
    "tensorwise": "compute capability 8.9 or newer (Ada, Hopper, Blackwell)",
    "blockwise": "compute capability 9.0 or newer (Hopper, Blackwell) and CUDA 12.9 or newer",
    "mxfp8": "compute capability 10.x or 11.x (Blackwell)",
}


def _supported(recipe: str, capability: tuple[int, int], cuda: tuple[int, int]) -> bool:
    if recipe in ("delayed", "tensorwise"):
        return capability >= (9, 0) or (capability >= (8, 9) and cuda >= (12, 1))
    if recipe == "blockwise":
        return capability >= (9, 0) and cuda >= (12, 9)
    if recipe == "mxfp8":
        return (10, 0) <= capability < (12, 0)
    raise ConfigError(f"unknown fp8 recipe {recipe!r}; choose one of {', '.join(_NEEDS)}")


def check_fp8_recipe(
    recipe: Optional[str], capability: tuple[int, int], cuda_version: Optional[str]
) -> None:
    """Raise ConfigError when `recipe` cannot run on a device of `capability` (major, minor)
    with CUDA `cuda_version` (torch.version.cuda, e.g. "13.0"); None (no FP8) always passes."""
    if recipe is None:
        return
    cuda = tuple(int(x) for x in (cuda_version or "0.0").split(".")[:2])
    if not _supported(recipe, tuple(capability), cuda):  # type: ignore[arg-type]
        others = [r for r in _NEEDS if _supported(r, tuple(capability), cuda)]  # type: ignore[arg-type]
        hint = (
            f"recipes this device runs: {', '.join(others)}"
            if others
            else "this device runs no FP8 recipe: train in bf16 (drop --fp8-recipe)"
        )
        raise ConfigError(
            f"fp8 recipe {recipe!r} needs {_NEEDS[recipe]}; this GPU has compute capability "
            f"{capability[0]}.{capability[1]} and CUDA {cuda_version}. {hint}"
        )


def check_device_fp8(recipe: Optional[str]) -> None:
    """`check_fp8_recipe` for the current CUDA device (no-op without FP8)."""
    if recipe is None:
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("FP8 needs a CUDA GPU with Transformer Engine; drop --fp8-recipe here")
    check_fp8_recipe(recipe, torch.cuda.get_device_capability(), torch.version.cuda)
