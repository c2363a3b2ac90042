"""One dtype-name map (megatron_navil.utils.dtypes): names and dtypes convert both ways, unknown
ones are refused with the choices named, and every place that lists dtype names (the config
literals, navil-convert's --dtype choices) lists exactly the map's names."""

import typing

import pytest
import torch

from megatron_navil.utils.dtypes import DTYPES, dtype_name, torch_dtype


def test_names_and_dtypes_convert_both_ways():
    for name, dtype in DTYPES.items():
        assert torch_dtype(name) is dtype and dtype_name(dtype) == name
    with pytest.raises(ValueError, match="choose one of float32, bfloat16, float16"):
        torch_dtype("fp8")
    with pytest.raises(ValueError, match="is not one of"):
        dtype_name(torch.int64)


def test_every_list_of_dtype_names_is_the_map():
    from checkpoint_tools.cli import DTYPES as CLI_CHOICES
    from megatron_navil.config.data import DataConfig
    from megatron_navil.config.parallel import PrecisionConfig

    assert CLI_CHOICES == ("auto", *DTYPES)
    hints = typing.get_type_hints(PrecisionConfig)
    assert typing.get_args(hints["params_dtype"]) == tuple(DTYPES)
    assert set(typing.get_args(typing.get_type_hints(DataConfig)["pixel_dtype"])) <= set(DTYPES)
