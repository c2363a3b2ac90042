"""A joint law fitted by `navil-scaling fit`, as the ScalingLaw `propose_vision_config` takes."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_navil.config.flavors import ScalingLaw
from megatron_navil.errors import UserError


class LawError(UserError):
    """A fit file without a usable law."""


def load_law(path: str) -> ScalingLaw:
    """The law of a `navil-scaling fit` JSON (its `law`: the largest budget's)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise LawError(f"cannot read the fitted law {path}: {e.strerror}") from None
    except json.JSONDecodeError:
        raise LawError(f"{path} is not JSON: pass the fit.json `navil-scaling fit` wrote") from None
    law = data.get("law") if isinstance(data, dict) else None
    if not law:
        raise LawError(
            f"{path} holds no joint law (the fit could not place V_opt for two LLM sizes; "
            "its `problems` say why): use the paper's law (omit --law) or extend the grid"
        )
    try:
        lo, hi = law["llm_range_billion"]
        return ScalingLaw(float(law["a"]), float(law["b"]), (float(lo), float(hi)), str(path))
    except (KeyError, TypeError, ValueError):
        raise LawError(f"{path}: `law` lacks a, b or llm_range_billion") from None
