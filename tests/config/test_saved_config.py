"""Saved run configs (navil_checkpoint.json `config`) are read back in both forms.
- the older form, as the trainer wrote it before the model section was typed (asset
  tests/assets/old_run_config.json, written by that code: `model.overrides` of dotted strings,
  data.seq_length / seed / pad_multiple copies, data.max_dynamic_patch) converts to exactly the
  config today's command line for the same run gives: overrides become model fields, the
  overwritten copies are dropped, the data patch limit (which won over the model's) moves to the
  model section;
- the current form round-trips through JSON unchanged;
- a checkpoint whose metadata holds the older form resumes (real process): the run continues at
  the next step and logs what changed against the saved run, and only that.
Where to look on failure: megatron_navil/config/pretrain.py (from_saved, _upgrade_saved,
changes_from), training/trainer.py (_log_config_changes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_navil.cli.args import parse_config
from megatron_navil.config.pretrain import PretrainConfig

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# The command line that wrote the asset, in today's words (data.max_dynamic_patch is now the
# model's; data.seq_length=1024 was a copy the job overwrote with --seq-length).
SAME_RUN = [
    "--mock-data",
    "--model",
    "debug-qwen3",
    "--seq-length",
    "256",
    "--global-batch-size",
    "2",
    "--lr",
    "1e-3",
    "--tensor-model-parallel-size",
    "2",
    "--sequence-parallel",
    "training.seed=7",
    "model.llm.num_layers=2",
    "model.vision.fullatt_block_indexes=[0]",
    "model.max_dynamic_patch=512",
]


def old_form(config: dict) -> dict:
    """A current run config as the trainer wrote it before: model.overrides of dotted keys, and
    the data section's copies at their old defaults (the job never wrote its values there)."""
    old = json.loads(json.dumps(config))
    model, flat = old["model"], {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk({k: v for k, v in model.items() if k != "flavor"}, "")
    old["model"] = {"flavor": model["flavor"], "overrides": flat}
    old["data"].update(
        seq_length=4096, pad_multiple=16, seed=1234, min_dynamic_patch=None, max_dynamic_patch=None
    )
    return old


def test_old_form_converts_to_todays_config():
    saved = json.loads((ASSETS / "old_run_config.json").read_text())
    assert "overrides" in saved["model"] and "seq_length" in saved["data"]  # really the old form
    cfg = PretrainConfig.from_saved(saved)
    assert cfg == parse_config(SAME_RUN)
    assert cfg.model.explicit == {
        "llm.num_layers": 2,
        "vision.fullatt_block_indexes": (0,),
        "max_dynamic_patch": 512,
    }
    assert cfg.training.seq_length == 256  # the copy (1024) is gone, the home kept its value


def test_current_form_round_trips():
    cfg = parse_config(SAME_RUN)
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert PretrainConfig.from_saved(saved) == cfg == PretrainConfig.from_dict(saved)
    assert PretrainConfig.from_saved(old_form(saved)) == cfg
    assert cfg.changes_from(cfg) == []


@pytest.mark.processes
@pytest.mark.slow
def test_checkpoint_with_old_form_resumes(tmp_path):
    from tests.launcher import run_ranks
    from tests.training.runner import losses, pretrain
    from tests.training.test_pretrain import BASE

    ck, first, second = tmp_path / "ck", tmp_path / "m1.jsonl", tmp_path / "m2.jsonl"
    run = BASE + ["--save", str(ck), "model.llm.num_layers=3"]
    pretrain(1, run + ["--train-iters", "2", "--metrics-file", str(first)])
    meta_path = ck / "iter_0000002" / "navil_checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["config"] = old_form(meta["config"])
    meta_path.write_text(json.dumps(meta))

    args = run + ["--train-iters", "3", "--metrics-file", str(second)]
    [(rc, out)] = run_ranks("megatron_navil.cli.pretrain", 1, args, timeout=600)
    assert rc == 0, out[-3000:]
    assert "resumed from" in out and "at step 2" in out, out[-3000:]
    changed = [line for line in out.splitlines() if "with changed settings" in line]
    assert len(changed) == 1, out[-3000:]
    # --train-iters and the metrics file changed; the model field read from model.overrides
    # did not
    assert "training.train_iters: 2 -> 3" in changed[0]
    assert "logging.metrics_file" in changed[0] and "model." not in changed[0], changed[0]
    assert sorted(losses(second)) == [3]
