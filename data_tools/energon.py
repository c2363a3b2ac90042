"""Turn a navil-preprocess output into a Megatron-Energon dataset (its `.nv-meta/` folder).

    navil-preprocess --energon shards/ [--num-workers 8]

The shards are plain WebDataset (docs/data_format.md): Energon reads them as they are; it only
needs its metadata folder, which its own `energon prepare` writes (it scans every tar once to
build `index.sqlite`). This runs it non-interactively: every shard in the `train` split, sample
type `CrudeWebdataset` (a sample is the dict of its members: `json`, and `jpg`/`png`/`webp` or
`0.jpg`, `1.png`, ... for several images; cook it in your TaskEncoder), our tars only. Needs the
`megatron-energon` package (the `test` extra installs it); the loader of this project does not
use Energon.
"""

from __future__ import annotations

import os
import subprocess
import sys

from data_tools.cli_common import UsageError

ENERGON_PREPARE = [
    "--non-interactive",
    "--split-ratio",
    "1,0,0",
    "--sample-type",
    "CrudeWebdataset",
    "--force-overwrite",
    "--no-progress",
]
"""`energon prepare` options: one train split, raw member dicts, no questions."""


def energon_prepare(root: str, num_workers: int = 1) -> str:
    """Write `root/.nv-meta/` with Energon's own tool; returns its path."""
    root = os.path.abspath(root)
    if not os.path.isfile(os.path.join(root, "manifest.json")):
        raise UsageError(f"{root}: no manifest.json; --energon needs a finished output")
    try:
        import megatron.energon  # noqa: F401
    except ImportError:
        raise UsageError(
            "--energon needs megatron-energon: pip install -c constraints.txt megatron-energon"
        ) from None
    cmd = [sys.executable, "-m", "megatron.energon.cli.main", "prepare", root, *ENERGON_PREPARE]
    cmd += ["--num-workers", str(max(num_workers, 1))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UsageError(f"energon prepare {root} failed: {tail[0]}")
    return os.path.join(root, ".nv-meta")
