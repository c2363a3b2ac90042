"""`navil-scaling` as a user meets it (in-process, no child processes): `plan` prints the
table and writes the JSON, `fit` writes fit.json and the plots; every mistake a user can make
(an unknown flavor, both --model and --llm-size, an empty or cut-off results file, a fit file
without a law) is one `error:` line with exit status 2, never a traceback.
On failure look at megatron_navil/cli/scaling.py.
"""

from __future__ import annotations

import json

import pytest

from megatron_navil.cli.scaling import main
from tests.scaling.test_fit import _rows


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_plan_prints_a_table_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    rc, out, err = _run(
        capsys,
        "plan",
        "--model",
        "navil-2b",
        "--gpus",
        "16",
        "--seq-length",
        "4096",
        "--global-batch-size",
        "64",
        "--json",
        str(out_json),
    )
    assert rc == 0, err
    assert "TP" in out and "MFU" in out and "ViT share" in out
    plan = json.loads(out_json.read_text())
    assert plan["ranked"] and plan["cluster"]["num_gpus"] == 16
    assert plan["workload"]["seq_length"] == 4096


def test_plan_flags_come_from_the_spec_fields(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--gpus",
        "--gpu-memory-gb",
        "--gpus-per-node",
        "--stage",
        "--visual-fraction",
        "--no-use-distributed-optimizer",
        "--inter-node-gbps",
    ):
        assert flag in out
    assert "[cluster.num_gpus]" in out  # help names the field it sets


@pytest.mark.parametrize(
    "argv,message",
    [
        (["plan", "--model", "navil-3b"], "unknown model flavor 'navil-3b'"),
        (["plan", "--model", "navil-2b", "--llm-size", "3"], "either --model FLAVOR or --llm-size"),
        (
            ["plan", "--model", "navil-2b", "--gpus", "12", "--gpus-per-node", "8"],
            "not whole nodes",
        ),
        (
            ["plan", "--model", "navil-2b", "--vision-from-law", "--law", "/nope.json"],
            "cannot read the fitted law",
        ),
    ],
)
def test_plan_mistakes_are_one_line(capsys, argv, message):
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_fit_writes_json_and_plots_then_plan_uses_the_law(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    rc, out, err = _run(capsys, "fit", str(results), "--out", str(tmp_path / "fit"))
    assert rc == 0, err
    for name in ("fit.json", "fit_loss_vs_data.png", "fit_loss_vs_vit.png", "fit_joint_law.png"):
        assert (tmp_path / "fit" / name).stat().st_size > 0
        assert (tmp_path / "fit" / name).read_bytes()[:4] in (b"\x89PNG", b'{\n "')
    assert "(c) @ 6e+07 samples: log V_opt" in out
    rc, out, err = _run(
        capsys,
        "plan",
        "--llm-size",
        "2",
        "--gpus",
        "8",
        "--law",
        str(tmp_path / "fit" / "fit.json"),
        "--top",
        "1",
    )
    assert rc == 0, err
    assert f"vision encoder from the joint law ({tmp_path / 'fit' / 'fit.json'})" in out


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "is empty"),
        ('{"cell": "a", "llm"', "is not a JSON row"),
    ],
)
def test_fit_mistakes_are_one_line(tmp_path, capsys, content, message):
    results = tmp_path / "r.jsonl"
    results.write_text(content)
    rc, _, err = _run(capsys, "fit", str(results), "--out", str(tmp_path / "fit"))
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
