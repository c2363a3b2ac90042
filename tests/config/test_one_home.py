"""Every setting has one home; nothing is a shadow copy that the job silently overwrites.
- DataConfig has no seq_length, seed, pad_multiple, min_dynamic_patch or max_dynamic_patch, and
  the old `model.overrides` dict is gone: setting any of them (YAML, dotted override,
  apply_overrides, a dict) is refused in ONE line that names the real home;
- the trainer's loaders get the sequence length and seed of `training` and the patch limits of
  the model section (checked by capturing what build_loaders passes to the loader);
- the sequence length must honour the layout: a multiple of the FP8 row multiple and, under
  sequence parallelism, of the TP size (one line naming --seq-length).
Where to look on failure: megatron_navil/config/{data,pretrain,model_section}.py,
training/data.py (build_loaders).
"""

from __future__ import annotations

import dataclasses

import pytest

from megatron_navil.cli.args import parse_config
from megatron_navil.config.base import ConfigError
from megatron_navil.config.data import DataConfig
from megatron_navil.config.pretrain import PretrainConfig

MOVED = {
    "data.seq_length": "set training.seq_length (--seq-length)",
    "data.seed": "set training.seed (--seed)",
    "data.pad_multiple": "it follows from the parallel layout and the FP8 recipe",
    "data.min_dynamic_patch": "set model.min_dynamic_patch",
    "data.max_dynamic_patch": "set model.max_dynamic_patch",
    "model.overrides": "write the fields under model: as NaViLModelConfig nests them",
}


def test_data_config_has_no_shadow_fields():
    names = {f.name for f in dataclasses.fields(DataConfig)}
    assert not names & {"seq_length", "seed", "pad_multiple", "min_dynamic_patch"}
    assert "max_dynamic_patch" not in names


@pytest.mark.parametrize("dotted", list(MOVED))
def test_a_removed_key_is_one_line_naming_its_home(tmp_path, dotted):
    section, key = dotted.split(".")
    value = {"llm.num_layers": 2} if key == "overrides" else 64
    want = f"{dotted} moved: {MOVED[dotted]}"

    def refused(call):
        with pytest.raises(ConfigError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(want) and "\n" not in msg, msg

    (tmp_path / "old.yaml").write_text(f"{section}:\n  {key}: {value}\n")
    refused(lambda: parse_config(["--mock-data", "--config", str(tmp_path / "old.yaml")]))
    if key != "overrides":  # a dict value has no one-word command-line form
        refused(lambda: parse_config(["--mock-data", f"{dotted}={value}"]))
    refused(lambda: PretrainConfig().apply_overrides({dotted: value}))
    refused(lambda: PretrainConfig.from_dict({section: {key: value}}))


def test_loaders_get_the_jobs_sequence_length_seed_and_patch_limits(monkeypatch):
    import megatron_navil.data.loader as loader_mod
    import megatron_navil.data.tokenizer as tok_mod
    from megatron_navil.training.data import build_loaders

    calls = {}

    def capture(name):
        def build(data_cfg, model_cfg, tokenizer, **kw):
            calls[name] = (data_cfg, model_cfg, kw)
            return name

        return build

    monkeypatch.setattr(loader_mod, "build_train_loader", capture("train"))
    monkeypatch.setattr(loader_mod, "build_valid_loader", capture("valid"))
    monkeypatch.setattr(tok_mod.NaViLTokenizer, "load", staticmethod(lambda path: "tokenizer"))
    cfg = PretrainConfig(tokenizer="tok").apply_overrides(
        {
            "training.seq_length": 512,
            "training.seed": 99,
            "model.max_dynamic_patch": 300,
            "data.train_paths": ["d"],
            "data.valid_paths": ["v"],
        }
    )
    model_cfg = cfg.resolved_model(vocabulary=(512, 500))  # the debug flavor's own
    train, valid = build_loaders(cfg, model_cfg, dp_rank=0, dp_size=1, packs_per_step=2)
    valid()
    assert train == "train" and set(calls) == {"train", "valid"}
    for name in ("train", "valid"):
        data_cfg, got_model, kw = calls[name]
        assert data_cfg is cfg.data and got_model.max_dynamic_patch == 300
        assert (kw["seq_length"], kw["seed"]) == (512, 99)


def test_sequence_length_must_suit_the_layout():
    ok = ["--mock-data", "--tensor-model-parallel-size", "3", "--sequence-parallel"]
    assert parse_config(ok + ["--seq-length", "48"]).seq_multiple() == 3
    with pytest.raises(ConfigError) as err:
        parse_config(ok + ["--seq-length", "32"])
    assert str(err.value).startswith("--seq-length 32 must be a multiple of 3")
