"""Every error a user can cause gives ONE clear line naming the file/key, exit status 2, no
traceback, and leaves no output (nor a temporary directory) behind.

Covered: missing paths (all three inputs), a truncated safetensors shard, an unmapped extra key,
a missing key, a wrong shape, a config.json that disagrees with the weights, a plain LLM given to
hf-to-navil, a flavor of the wrong backbone, an existing output, a TP size the model cannot
split, a truncated .distcp shard, a checkpoint whose metadata disagrees with its tensors, a
tokenizer that places the special tokens elsewhere (or is missing), and verify on a mismatched
pair. One case runs as a real process to prove there is no traceback
and the status reaches the shell.
"""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from tests.checkpoint_tools.plain_llm import make_llm_dir
from tests.launcher import ROOT


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _hf_edit(navil, tmp_path, edit):
    hf = _copy(navil / "hf", tmp_path / "hf")
    shard = next(hf.glob("*.safetensors"))
    tensors = load_file(str(shard))
    edit(tensors)
    for f in hf.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, str(hf / "model.safetensors"))
    return hf


def _expect(cli, argv, *fragments, output=None):
    rc, out, err = cli(argv)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    if output is not None:
        assert not output.exists()
        assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.tmp")]


def test_missing_inputs(cli, tmp_path):
    _expect(
        cli,
        ["hf-to-navil", "--hf", tmp_path / "nope", "--output", tmp_path / "o"],
        "nope is not a directory",
        output=tmp_path / "o",
    )
    _expect(
        cli,
        ["navil-to-hf", "--load", tmp_path / "nope", "--output", tmp_path / "o"],
        "no checkpoint at",
        output=tmp_path / "o",
    )
    _expect(
        cli,
        [
            "llm-to-navil",
            "--hf-llm",
            tmp_path / "nope",
            "--flavor",
            "debug-qwen3",
            "--output",
            tmp_path / "o",
        ],
        "--hf-llm",
        "is not a directory",
        output=tmp_path / "o",
    )


def test_truncated_shard(cli, navil, tmp_path):
    hf = _copy(navil / "hf", tmp_path / "hf")
    shard = next(hf.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1000])
    _expect(
        cli,
        ["hf-to-navil", "--hf", hf, "--output", tmp_path / "o"],
        shard.name,
        "is truncated",
        output=tmp_path / "o",
    )


@pytest.mark.parametrize(
    "edit,fragments",
    [
        (
            lambda t: t.update({"vision_model.extra.weight": t["mlp1.0.weight"].clone()}),
            ["vision_model.extra.weight", "does not map"],
        ),
        (
            lambda t: t.pop("language_model.model.layers.2.mlp_ve.up_proj.weight"),
            ["lacks language_model.model.layers.2.mlp_ve.up_proj.weight"],
        ),
        (
            lambda t: t.update({"mlp1.1.bias": t["mlp1.1.bias"][:-1].clone()}),
            ["mlp1.1.bias has shape [63]", "needs [64]"],
        ),
    ],
)
def test_key_and_shape_mismatches(cli, navil, tmp_path, edit, fragments):
    hf = _hf_edit(navil, tmp_path, edit)
    _expect(
        cli,
        ["hf-to-navil", "--hf", hf, "--output", tmp_path / "o"],
        *fragments,
        output=tmp_path / "o",
    )


def test_config_that_disagrees_with_the_weights(cli, navil, tmp_path):
    hf = _copy(navil / "hf", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["llm_config"]["num_hidden_layers"] = 5
    (hf / "config.json").write_text(json.dumps(config))
    _expect(
        cli,
        ["hf-to-navil", "--hf", hf, "--output", tmp_path / "o"],
        "lacks language_model.model.layers.4.",
        output=tmp_path / "o",
    )


def test_wrong_kind_of_directory(cli, tmp_path):
    make_llm_dir(tmp_path / "llm", "internlm2", tokenizer=False)
    _expect(
        cli,
        ["hf-to-navil", "--hf", tmp_path / "llm", "--output", tmp_path / "o"],
        "not 'navil_chat'",
        "llm-to-navil",
    )
    _expect(
        cli,
        [
            "llm-to-navil",
            "--hf-llm",
            tmp_path / "llm",
            "--flavor",
            "debug-qwen3",
            "--output",
            tmp_path / "o",
        ],
        "expects an qwen3 backbone",
        "internlm2",
    )


def test_existing_output_and_bad_layout(cli, navil, tmp_path):
    (tmp_path / "taken").mkdir()
    _expect(
        cli,
        ["hf-to-navil", "--hf", navil / "hf", "--output", tmp_path / "taken"],
        "taken already exists",
    )
    _expect(
        cli,
        ["navil-to-hf", "--load", navil / "ck", "--output", tmp_path / "taken"],
        "taken already exists",
    )
    _expect(
        cli,
        [
            "hf-to-navil",
            "--hf",
            navil / "hf",
            "--output",
            tmp_path / "o",
            "--tensor-model-parallel-size",
            "3",
        ],
        "--tensor-model-parallel-size 3",
        output=tmp_path / "o",
    )


def test_damaged_or_mismatched_checkpoint(cli, navil, tmp_path):
    ck = _copy(navil / "ck", tmp_path / "ck")
    shard = ck / "iter_0000000/__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:-4096])
    _expect(
        cli,
        ["navil-to-hf", "--load", ck, "--output", tmp_path / "o"],
        "__0_0.distcp is truncated",
        output=tmp_path / "o",
    )
    shard.write_bytes(data)
    meta_path = ck / "iter_0000000/navil_checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["llm"]["ffn_hidden_size"] = 96
    meta_path.write_text(json.dumps(meta))
    _expect(
        cli,
        ["navil-to-hf", "--load", ck, "--output", tmp_path / "o"],
        "linear_fc1.weight is stored as",
        output=tmp_path / "o",
    )
    _expect(
        cli,
        ["verify", "--load", ck, "--hf", navil / "hf"],
        "config mismatch",
        "llm.ffn_hidden_size: checkpoint 96 vs config 128",
    )


def test_tokenizer_that_disagrees(cli, navil, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": 7, "content": "</box>"}]})
    )
    _expect(
        cli,
        ["navil-to-hf", "--load", navil / "ck", "--output", tmp_path / "o", "--tokenizer", tok],
        "places </box> at id 7",
        output=tmp_path / "o",
    )
    _expect(
        cli,
        [
            "navil-to-hf",
            "--load",
            navil / "ck",
            "--output",
            tmp_path / "o",
            "--tokenizer",
            tmp_path / "empty",
        ],
        "holds no tokenizer",
        output=tmp_path / "o",
    )


@pytest.mark.processes
def test_real_process_exit_status(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "checkpoint_tools.cli",
            "hf-to-navil",
            "--hf",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in p.stderr
