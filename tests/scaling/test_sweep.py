"""`navil-scaling sweep` without running anything: the grid, the commands, the rows, resuming.

- Every cell's command is one navil-pretrain accepts and means what the grid says: parsed by
  navil-pretrain's own parser (megatron_navil.cli.args.parse_config), the model fields, steps,
  evaluation interval and data paths come out as set (the independent reference is that
  parser; a data flag swallowing the model fields was a real bug this catches).
- Budgets become steps whose last one is an evaluation, within one evaluation interval of the
  budget.
- Rows: a finished run is `ok`, a non-finite loss `diverged` (with the step), anything else
  `failed` with its error line; resuming skips ok/diverged cells and re-runs failed ones.
- A sweep directory keeps its grid (another grid is refused); the SLURM file is an array with
  one cell per task.
The real runs are in test_micro_grid.py. On failure: megatron_navil/scaling/sweep*.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_navil.cli.args import parse_config
from megatron_navil.config.base import ConfigError
from megatron_navil.scaling import sweep as sw
from megatron_navil.scaling.sweep_spec import SweepSpec, grid, steps_for

LLM = {
    "s": {"hidden_size": 32, "ffn_hidden_size": 64, "kv_channels": 8},
    "m": {"hidden_size": 64, "ffn_hidden_size": 128, "kv_channels": 16},
}
VIT = {
    "a": {"hidden_size": 16, "ffn_hidden_size": 64},
    "b": {"hidden_size": 32},
    "c": {"hidden_size": 64, "num_layers": 1},
}


def _spec(**kw) -> SweepSpec:
    spec = SweepSpec(
        llm=LLM,
        vit=VIT,
        budgets_samples=(100, 400),
        samples_per_pack=2.5,
        global_batch_size=2,
        num_evals=3,
        **kw,
    )
    spec.validate()
    return spec


def test_grid_is_the_product_with_unique_ids():
    cells = grid(_spec(), 2.5)
    assert len(cells) == 2 * 3 * 2
    assert len({c.id for c in cells}) == 12 and [c.index for c in cells] == list(range(12))
    c = next(c for c in cells if c.llm == "m" and c.vit == "c")
    assert c.fields == {
        "llm.hidden_size": 64,
        "llm.ffn_hidden_size": 128,
        "llm.kv_channels": 16,
        "vision.hidden_size": 64,
        "vision.num_layers": 1,
    }


@pytest.mark.parametrize("budget", [7, 100, 333, 5000])
def test_budget_becomes_steps_ending_on_an_evaluation(budget):
    spec = _spec()
    iters, interval = steps_for(spec, budget, 2.5)
    assert iters % interval == 0 and iters // interval == spec.num_evals
    per_step = spec.global_batch_size * 2.5
    assert abs(iters * per_step - budget) <= interval * per_step / 2 + per_step * spec.num_evals


def test_commands_mean_what_the_grid_says(tmp_path, monkeypatch):
    # no tokenizer file here: navil-pretrain's parser would read its vocabulary
    monkeypatch.setattr("megatron_navil.data.tokenizer.tokenizer_vocabulary", lambda p: (512, 500))
    spec = _spec(
        mock_data=False,
        data_path=("0.7", "/d/a", "0.3", "/d/b"),
        valid_data_path=("/d/v",),
        tokenizer="/d/tok",
        extra_args=("--clip-grad", "0.5"),
    )
    for cell in grid(spec, 2.5):
        args = sw.pretrain_args(spec, cell, tmp_path / cell.id)
        cfg = parse_config(args)
        model = cfg.model.resolve()
        for dotted, value in cell.fields.items():
            section, name = dotted.split(".")
            assert getattr(getattr(model, section), name) == value, (cell.id, dotted)
        assert cfg.training.train_iters == cell.train_iters
        assert cfg.training.eval_interval == cell.eval_interval
        assert cfg.data.train_paths == ("/d/a", "/d/b") and cfg.data.valid_paths == ("/d/v",)
        assert cfg.tokenizer == "/d/tok" and cfg.optimizer.clip_grad == 0.5
        assert cfg.logging.metrics_file == str(tmp_path / cell.id / "metrics.jsonl")
    two = _spec(nproc_per_cell=2)
    cmd = sw.command(two, grid(two, 2.5)[0], tmp_path)
    assert "torch.distributed.run" in cmd and cmd[cmd.index("--nproc_per_node") + 1] == "2"


def _records(n, bad_step=None, valid_every=2):
    out = []
    for s in range(1, n + 1):
        r = {
            "step": s,
            "loss": None if s == bad_step else 5.0 - s * 0.1,
            "num_samples": 5,
            "num_tokens": 512,
        }
        if s % valid_every == 0:
            r["valid_loss"] = 4.0 - s * 0.1
        out.append(r)
    return out


def test_rows_say_ok_diverged_or_failed():
    spec = _spec()
    cell = grid(spec, 2.5)[0]
    n = cell.train_iters
    ok = sw.build_row(spec, cell, _records(n, valid_every=cell.eval_interval), 0, "", 3.0)
    assert ok["status"] == "ok" and ok["samples_seen"] == 5 * n and ok["tokens_seen"] == 512 * n
    assert [e["step"] for e in ok["evals"]] == list(
        range(cell.eval_interval, n + 1, cell.eval_interval)
    )
    assert ok["final_valid_loss"] == ok["evals"][-1]["valid_loss"]
    assert ok["llm_params"] > 0 and ok["vit_params"] > 0 and ok["wall_time_s"] == 3.0
    nan = sw.build_row(
        spec, cell, _records(n, bad_step=2), 2, "error: 3 steps in a row had a non-finite loss", 1.0
    )
    assert nan["status"] == "diverged" and nan["reason"] == "non-finite loss at step 2"
    dead = sw.build_row(spec, cell, _records(1), 1, "Traceback\nerror: cannot read data", 1.0)
    assert dead["status"] == "failed" and "cannot read data" in dead["reason"]
    short = sw.build_row(spec, cell, _records(n - 1), 0, "", 1.0)
    assert short["status"] == "failed"


def test_resume_skips_finished_and_reruns_failed_cells(tmp_path):
    results = tmp_path / "results.jsonl"
    for cell, status in [("a", "ok"), ("b", "diverged"), ("c", "failed"), ("d", "ok")]:
        sw.append_row(results, {"cell": cell, "status": status})
    sw.append_row(results, {"cell": "d", "status": "failed"})  # the latest row counts
    with open(results, "a") as f:
        f.write('{"cell": "e", "sta')  # cut off by a kill
    assert sw.finished(results) == {"a", "b"}


def test_a_sweep_directory_keeps_its_grid(tmp_path):
    sw.prepare(_spec(), tmp_path)
    sw.prepare(_spec(), tmp_path)  # the same grid: fine
    with pytest.raises(sw.SweepError, match="another grid"):
        sw.prepare(_spec(lr=1e-3), tmp_path)


def test_slurm_file_is_an_array_of_cells(tmp_path):
    spec_file = tmp_path / "grid.json"
    spec_file.write_text(json.dumps(_spec().to_dict()))
    path = sw.write_sbatch(str(spec_file), _spec(), tmp_path / "out", 5, ["--partition=gpu"])
    text = Path(path).read_text()
    assert "#SBATCH --job-name=navil-scaling --array=0-11%5" in text
    assert "#SBATCH --partition=gpu" in text
    assert (
        f'navil-scaling sweep {spec_file} --out {tmp_path / "out"} --cell "$SLURM_ARRAY_TASK_ID"'
        in text
    )


def test_bad_specs_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="`vit` lists no sizes"):
        SweepSpec(llm=LLM, budgets_samples=(1,)).validate()
    with pytest.raises(ConfigError, match="samples_per_pack"):
        SweepSpec(
            llm=LLM, vit=VIT, budgets_samples=(1,), mock_data=False, data_path=("d",), tokenizer="t"
        ).validate()
    with pytest.raises(ConfigError, match="hidden_sise"):
        SweepSpec(llm={"x": {"hidden_sise": 3}}, vit=VIT, budgets_samples=(1,)).validate()
    bad = tmp_path / "g.yaml"
    bad.write_text("flavor: debug-internlm2\nllm: {a: {}}\nvit: {b: {}}\nbudget: [1]\n")
    with pytest.raises(ConfigError, match="unknown config key"):
        SweepSpec.load(str(bad))


def test_mock_samples_per_pack_is_the_loaders_mean():
    from megatron_navil.training.data import MockPackLoader

    spec = _spec()
    cfg = next(iter(spec.sections().values())).resolve()
    loader = MockPackLoader(cfg, spec.seq_length, spec.seed, 0, 1)
    mean = sum(int(next(loader).metadata["samples"]) for _ in range(60)) / 60
    assert sw.mock_samples_per_pack(spec) == pytest.approx(mean)
    assert 1.0 < mean < 4.0
