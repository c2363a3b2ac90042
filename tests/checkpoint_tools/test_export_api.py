"""`export_hf`, the library call behind navil-to-hf and `navil-pretrain --save-hf`.

- the three inputs it accepts give byte-identical directories: a saved checkpoint (read without
  a process group), the canonical state dict in memory, and the model chunks of an unsharded
  model;
- a model config that does not match the checkpoint is refused naming the field; in-memory
  weights without a config, or an existing output, are refused; `overwrite=True` replaces;
- the tokenizer written next to an llm-to-navil checkpoint is exported by default, with the 12
  special tokens registered in the HF files and loadable as a NaViLTokenizer.
Exact comparisons: bytes.
"""

import json

import pytest

from megatron_navil.checkpoint import load_model, read_metadata
from megatron_navil.config import NaViLModelConfig, ParallelConfig, PrecisionConfig
from megatron_navil.conversion import ConversionError, export_hf
from megatron_navil.models.navil import NaViLModel
from tests.checkpoint_tools.conftest import same_files
from tests.checkpoint_tools.plain_llm import make_llm_dir


def test_inputs_give_identical_directories(navil, tmp_path, megatron_single_process):
    cfg = NaViLModelConfig.from_dict(read_metadata(navil / "ck")["model"])
    export_hf(navil / "ck", tmp_path / "from_ckpt")
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())
    load_model(navil / "ck", [model], cfg)
    export_hf([model], tmp_path / "from_chunks", cfg)
    export_hf(model.state_dict(), tmp_path / "from_state", cfg)
    assert same_files(tmp_path / "from_ckpt", tmp_path / "from_chunks") == []
    assert same_files(tmp_path / "from_ckpt", tmp_path / "from_state") == []
    assert same_files(tmp_path / "from_ckpt", navil / "hf") == []


def test_refusals(navil, tmp_path):
    cfg = NaViLModelConfig.from_dict(read_metadata(navil / "ck")["model"])
    other = cfg.apply_overrides({"vision.num_layers": 3})
    with pytest.raises(ConversionError, match="vision.num_layers: checkpoint 2 vs config 3"):
        export_hf(navil / "ck", tmp_path / "x", other)
    with pytest.raises(ConversionError, match="needs model_cfg"):
        export_hf({}, tmp_path / "x")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        export_hf(navil / "ck", tmp_path / "taken")
    export_hf(navil / "ck", tmp_path / "taken", overwrite=True)
    assert same_files(tmp_path / "taken", navil / "hf") == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tokenizer_travels_with_the_checkpoint(tmp_path, cli):
    from megatron_navil.data.tokenizer import NaViLTokenizer

    make_llm_dir(tmp_path / "llm", "internlm2")
    assert (
        cli(
            [
                "llm-to-navil",
                "--hf-llm",
                tmp_path / "llm",
                "--flavor",
                "debug-internlm2",
                "--output",
                tmp_path / "ck",
                "--no-progress",
            ]
        )[0]
        == 0
    )
    export_hf(tmp_path / "ck", tmp_path / "hf")
    added = json.loads((tmp_path / "hf/added_tokens.json").read_text())
    assert added["</box>"] == 224 and added["<IMG_FRAME_BREAK>"] == 235
    decoder = json.loads((tmp_path / "hf/tokenizer_config.json").read_text())[
        "added_tokens_decoder"
    ]
    assert decoder["226"]["content"] == "<IMG_CONTEXT>" and decoder["226"]["special"]
    tok = NaViLTokenizer.load(str(tmp_path / "hf"))
    assert tok.encode("a<img>b")[1] == 228
    # Without our config.json section (like a released model) the special-token start comes
    # from the tokenizer files.
    config = json.loads((tmp_path / "hf/config.json").read_text())
    del config["megatron_navil"]
    (tmp_path / "hf/config.json").write_text(json.dumps(config))
    assert (
        cli(
            ["hf-to-navil", "--hf", tmp_path / "hf", "--output", tmp_path / "ck2", "--no-progress"]
        )[0]
        == 0
    )
    assert read_metadata(tmp_path / "ck2")["model"]["llm"]["first_special_token_id"] == 224
