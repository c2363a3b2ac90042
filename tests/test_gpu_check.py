"""The prepared GPU check (benchmarks/gpu_check.sh) works end to end on CPU, as `--dry-run`.

Proves, before anyone spends GPU time on it, that the one-shot check the GPU machine runs:
- exits 0 and writes results.json with every section (env, step, gpu_tests, training, decode);
- runs the step benchmark (benchmarks/bench_step.py, its own tests: tests/test_bench_step.py) as
  a section: its parts land in results.json, its JSON in the logs, one summary row per part;
- gets through the real training path (synthetic captions -> tokenizer -> shards -> torchrun
  navil-pretrain, local backend, fp32): the dry-run debug run finishes all its steps with a
  finite, falling loss, and the FP8 / navil-2b runs are recorded as skipped for the dry run;
- runs the marked GPU tests through pytest and records their counts (all skip on CPU);
- measures DALI (CPU operators here) and PIL decode through benchmarks/bench_loader.py, both > 0
  img/s;
- leaves exactly results.json, logs.tar.gz (every child's logs, the metrics files) and
  summary.txt in its output folder (the device tool brings back at most 8 files);
- prints its summary table last;
- records a step that exceeds its (configurable) timeout as "timeout" and still exits 0, with
  the next section run (cheap: env probe limited to 0.5 s, then the GPU tests).
When it fails, read <out>/results.json and the logs in <out>/logs.tar.gz.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("env", "step", "gpu_tests", "training", "decode")
HEADER = "== gpu_check summary"

pytestmark = pytest.mark.processes  # every test here runs gpu_check.sh in a child


def _run(
    out: Path, *args: str, env_extra: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **(env_extra or {})}
    env.pop("OUT", None)  # --out decides, never a stray $OUT
    return subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _table(stdout: str) -> list[str]:
    """The lines from the summary header to the end; asserts the table is the last output."""
    lines = stdout.rstrip("\n").splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith(HEADER)]
    assert starts, f"no summary table in the output:\n{stdout[-2000:]}"
    table = lines[starts[-1] :]
    assert table[1].split() == ["section", "status", "time_s", "key", "numbers"]
    assert table[-1].startswith("total "), f"the table is not the last output:\n{stdout[-2000:]}"
    for row in table[2:]:  # nothing but table rows after the header
        assert row.split()[1] in ("ok", "failed", "timeout", "skipped", "error", "partial"), row
    return table


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run(out)
    return proc, out, json.loads((out / "results.json").read_text())


def test_dry_run_exits_0_with_every_section(dry_run):
    proc, out, results = dry_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the device tool brings back at most 8 files from $OUT: the check writes three
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.json", "summary.txt"]
    assert results["dry_run"] is True
    assert set(results["sections"]) == set(SECTIONS)
    for name, sec in results["sections"].items():
        assert sec["status"] == "ok", (name, sec)


def test_dry_run_training_loss_finite_and_falling(dry_run):
    _, out, results = dry_run
    train = results["sections"]["training"]
    run = train["runs"]["debug-fp32"]
    assert run["exit_code"] == 0 and run["status"] == "ok", run
    assert run["steps_done"] == run["steps"] == train["steps_per_run"]
    assert run["finite"] and run["falling"], run["losses"]
    assert run["tokens_per_s"] > 0 and run["mem_gb"] > 0
    with tarfile.open(out / results["logs"]) as tar:  # logs travel as one archive
        names = set(tar.getnames())
        assert {run["metrics_file"], run["stderr"], run["stdout"]} <= names
        rows = tar.extractfile(run["metrics_file"]).read().decode().splitlines()
    assert len(rows) == run["steps"]
    for name in ("debug-fp8-delayed", "2b-l2-bf16", "2b-l2-fp8-delayed"):
        assert train["runs"][name] == {"status": "skipped", "reason": "dry run"}


def test_dry_run_gpu_tests_recorded_as_skipped(dry_run):
    _, _, results = dry_run
    tests = results["sections"]["gpu_tests"]
    assert tests["exit_code"] == 0
    assert tests["skipped"] > 0 and tests["passed"] == tests["failed"] == tests["errors"] == 0
    assert sum(tests["skip_reasons"].values()) == tests["skipped"]


def test_dry_run_decode_positive_both_sides(dry_run):
    _, _, results = dry_run
    rows = results["sections"]["decode"]["rows"]
    assert set(rows) == {"single-scale", "multi-scale"}
    for r in rows.values():
        assert r["dali_img_s"] > 0 and r["pil_img_s"] > 0


def test_dry_run_prints_the_table_last(dry_run):
    proc, out, _ = dry_run
    table = _table(proc.stdout)
    assert (out / "summary.txt").read_text().splitlines() == table
    names = {row.split()[0] for row in table[2:]}
    assert {"env", "gpu_tests", "training", "train:debug-fp32", "decode:single-scale"} <= names


def test_dry_run_step_section(dry_run):
    proc, out, results = dry_run
    step = results["sections"]["step"]
    assert step["exit_code"] == 0 and step["status"] == "ok", step
    assert set(step["parts"]) == {
        "layers",
        "vit",
        "fp8",
        "step",
        "host_syncs",
        "profile",
        "switches",
    }
    assert all(p["status"] in ("ok", "skipped") for p in step["parts"].values())
    assert step["table"][0].startswith("## bench_step")  # the child's markdown table, kept
    with tarfile.open(out / results["logs"]) as tar:
        assert step["results_file"] in set(tar.getnames())
    names = [row.split()[0] for row in _table(proc.stdout)[2:]]
    assert {"step", "step:layers", "step:fp8", "step:vit", "step:full", "step:switches"} <= set(
        names
    )
    assert names.index("step") == names.index("env") + 1  # right after env: it gets its time


def test_section_timeout_is_recorded_and_the_check_goes_on(tmp_path):
    proc = _run(
        tmp_path,
        "--sections",
        "env,gpu_tests",
        env_extra={"GPU_CHECK_TIMEOUTS": "env=0.5"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    env, tests = results["sections"]["env"], results["sections"]["gpu_tests"]
    assert env["status"] == "timeout", env
    assert results["timeouts_s"]["env"] == 0.5 and env["seconds"] < 15
    assert tests["status"] == "ok" and tests["exit_code"] == 0
    assert results["sections"]["training"]["status"] == "skipped"
    table = _table(proc.stdout)
    assert any(row.split()[:2] == ["env", "timeout"] for row in table)
