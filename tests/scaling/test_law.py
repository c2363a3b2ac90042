"""The joint law as `propose_vision_config` uses it: the paper's built-in points, or a law
`navil-scaling fit` wrote, and an LLM size outside the fitted range is flagged, not silently
extrapolated.

The built-in law must still reproduce the paper's read-off points (0.5B -> 0.3B, 1.8B -> 0.6B,
7B -> 1.2B, within 10%); a fitted JSON's coefficients must be the ones used; a fit file with no
law is one error saying why. On failure: megatron_navil/config/flavors.py, scaling/law.py,
scaling/shapes.py.
"""

from __future__ import annotations

import json
import math

import pytest

from megatron_navil.config.flavors import (
    PAPER_LAW,
    SCALING_LAW_POINTS,
    ScalingLaw,
    propose_vision_config,
    propose_vision_size,
)
from megatron_navil.scaling.law import LawError, load_law
from megatron_navil.scaling.shapes import planned_model, vision_size_billion


def test_paper_law_goes_through_the_read_off_points():
    for llm, vit in SCALING_LAW_POINTS:
        assert PAPER_LAW.vision_size(llm) == pytest.approx(vit, rel=0.1)
    assert 0.4 < PAPER_LAW.b < 0.6 and PAPER_LAW.llm_range == (0.5, 7.0)
    assert not PAPER_LAW.extrapolates(2.0) and PAPER_LAW.extrapolates(30.0)


def test_a_fitted_law_is_the_one_used(tmp_path):
    f = tmp_path / "fit.json"
    f.write_text(
        json.dumps({"law": {"a": math.log(0.2), "b": 1.0, "llm_range_billion": [0.1, 10.0]}})
    )
    law = load_law(str(f))
    assert law == ScalingLaw(math.log(0.2), 1.0, (0.1, 10.0), str(f))
    assert propose_vision_size(5.0, law) == pytest.approx(1.0)
    v = propose_vision_config(5.0, law=law)
    assert v.num_parameters() / 1e9 == pytest.approx(1.0, rel=0.1)
    assert v.num_attention_heads % 4 == 0  # splits over TP 1, 2, 4


def test_extrapolation_is_said(tmp_path):
    section, notes = planned_model(llm_size=30.0)
    cfg = section.resolve()
    assert vision_size_billion(cfg) == pytest.approx(PAPER_LAW.vision_size(30.0), rel=0.15)
    assert any("extrapolation" in n for n in notes)
    _, inside = planned_model(flavor="navil-2b", vision_from_law=True)
    assert not any("extrapolation" in n for n in inside)


def test_llm_size_builds_an_llm_of_that_size():
    for size in (0.5, 3.0, 14.0, 70.0):
        section, _ = planned_model(llm_size=size)
        cfg = section.resolve()
        assert cfg.llm.num_parameters()[0] / 1e9 == pytest.approx(size, rel=0.15)
        assert cfg.llm.num_attention_heads % cfg.llm.num_query_groups == 0


def test_fit_file_without_a_law_is_one_error(tmp_path):
    f = tmp_path / "fit.json"
    f.write_text(json.dumps({"law": None, "problems": ["..."]}))
    with pytest.raises(LawError, match="holds no joint law"):
        load_law(str(f))
    with pytest.raises(LawError, match="cannot read"):
        load_law(str(tmp_path / "missing.json"))
