"""The code of an earlier commit, for benchmarks that measure it side by side with this checkout
(bench_index.py, bench_preprocess.py: `--old-commit`)."""

from __future__ import annotations

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def old_tree(work: str, commit: str, paths: tuple[str, ...] = ("megatron_navil",)) -> str:
    """`paths` of this repository as of `commit` (git archive), extracted once under
    `work/old-<commit>`; the directory to put first on PYTHONPATH."""
    dst = os.path.join(work, f"old-{commit}")
    if not os.path.isdir(dst):
        os.makedirs(dst)
        tar = subprocess.run(
            ["git", "-C", REPO, "archive", commit, *paths], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", dst], input=tar, check=True)
    return dst
