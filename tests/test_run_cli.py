"""`megatron_navil.utils.cli.run_cli`, the one error convention of every console script: every
package's user-error type (ConfigError, CheckpointError, ConversionError, TokenizerError,
DataError, the data tools' UsageError) is a UserError and becomes ONE `error:` line with exit
status 2; JobError exit 1; Ctrl-C 130; in a multi-rank job an error every rank shares is printed
by rank 0 only, one rank's own error carries its rank; a bug keeps its traceback; cleanup always
runs. Where to look on failure: megatron_navil/errors.py, megatron_navil/utils/cli.py."""

import pytest

from data_tools.cli_common import UsageError
from megatron_navil.checkpoint import CheckpointError
from megatron_navil.config.base import ConfigError
from megatron_navil.conversion.errors import ConversionError
from megatron_navil.data.index import DataError
from megatron_navil.data.tokenizer import TokenizerError
from megatron_navil.errors import JobError, UserError
from megatron_navil.utils.cli import run_cli


def _raiser(exc):
    def body(argv):
        raise exc

    return body


@pytest.mark.parametrize(
    "cls", [ConfigError, CheckpointError, ConversionError, TokenizerError, DataError, UsageError]
)
def test_every_user_error_is_one_line_exit_2(cls, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert issubclass(cls, UserError)
    cleaned = []
    rc = run_cli(
        _raiser(cls("bad thing at /x:\n  key a\n  key b")), [], cleanup=lambda: cleaned.append(1)
    )
    err = capsys.readouterr().err
    assert rc == 2 and cleaned == [1]
    assert err == "error: bad thing at /x:; key a; key b\n"


def test_job_error_interrupt_and_bug(capsys):
    assert run_cli(_raiser(JobError("worker 3 was killed")), []) == 1
    assert capsys.readouterr().err == "error: worker 3 was killed\n"
    assert run_cli(_raiser(KeyboardInterrupt()), [], interrupted="stopped") == 130
    assert capsys.readouterr().err == "stopped\n"
    with pytest.raises(ZeroDivisionError):  # a bug is not turned into a one-liner
        run_cli(lambda argv: 1 // 0, [])


@pytest.mark.parametrize(
    "rank,shared,expected",
    [
        ("0", True, "error: layout\n"),
        ("1", True, ""),
        ("0", False, "[rank 0] error: layout\n"),
        ("1", False, "[rank 1] error: layout\n"),
    ],
)
def test_multi_rank_reporting(rank, shared, expected, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    # an earlier test of this process may have left a 1-rank process group: use the env rank
    monkeypatch.setattr("megatron_navil.utils.cli.global_rank", lambda: int(rank))
    assert run_cli(_raiser(ConfigError("layout", same_on_every_rank=shared)), []) == 2
    assert capsys.readouterr().err == expected


def test_every_console_script_uses_run_cli(tmp_path, capsys, monkeypatch):
    """navil-caption, navil-demo and navil-make-captions report bad input the same way: one
    `error:` line naming it, exit 2 (the others are tested in their own modules)."""
    from data_tools.synthetic_captions import main as make_captions
    from megatron_navil.cli.caption import main as caption
    from megatron_navil.cli.demo import main as demo

    monkeypatch.setenv("WORLD_SIZE", "1")
    cases = [
        (
            caption,
            [
                "--load",
                str(tmp_path / "none"),
                "--tokenizer-model",
                str(tmp_path),
                "--image",
                "x.png",
            ],
            f"no checkpoint at {tmp_path / 'none'}",
        ),
        (demo, ["--flavor", "no-such-flavor"], "no-such-flavor"),
        (make_captions, ["--output", str(tmp_path / "c"), "--size", "8"], "--size 8"),
    ]
    for main, argv, named in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert (
        make_captions(
            [
                "--output",
                str(tmp_path / "c"),
                "--num-train",
                "2",
                "--num-valid",
                "0",
                "--size",
                "32",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "c" / "images").iterdir())) == 2


def test_in_process_scripts_leave_the_callers_process_group(megatron_single_process, tmp_path):
    """A console script called in-process (a test, a notebook) while the caller holds Megatron's
    process groups fails on bad input without tearing those groups down; before the fix the
    demo's cleanup destroyed the session's groups and broke every later test of this process."""
    from megatron.core import parallel_state

    from megatron_navil.cli.caption import main as caption
    from megatron_navil.cli.demo import main as demo

    assert demo(["--flavor", "no-such-flavor"]) == 2
    missing = str(tmp_path / "none")
    assert caption(["--load", missing, "--tokenizer-model", missing, "--image", "x.png"]) == 2
    assert parallel_state.model_parallel_is_initialized()
