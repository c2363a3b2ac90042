"""The tree passes `ruff check` and `ruff format --check` with the settings of pyproject.toml
(Megatron's line length 100, pycodestyle + pyflakes + import order), so CI fails on lint or
formatting drift (marked `processes`: --fast leaves it out, CI runs it). Fix locally with
`ruff check --fix . && ruff format .`."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:  # a test dependency (setup.py [test]): its absence is a broken environment
        pytest.fail("ruff is not installed: pip install -e '.[test]' -c constraints.txt")
    return [exe]


@pytest.mark.processes
@pytest.mark.parametrize(
    "args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"]
)
def test_ruff(args):
    r = subprocess.run(_ruff() + args, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"ruff {' '.join(args)}:\n{r.stdout[-4000:]}{r.stderr[-2000:]}"
