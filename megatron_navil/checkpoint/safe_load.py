"""Weights-only unpickling for everything a checkpoint load reads (untrusted checkpoint dirs).

A torch_dist checkpoint holds pickles besides its tensors: `common.pt` (scheduler, step,
counters, the loader state), and each ShardedObject as torch.save bytes inside the `.distcp`
files (our RNG state, Transformer Engine's `_extra_state`). torch.distributed.checkpoint's
`DefaultLoadPlanner.load_bytes`, which Megatron's load planner inherits, reads those bytes with
`torch.load(weights_only=False)`: a checkpoint directory from elsewhere can run code on every
rank that resumes from it. (The `.metadata` file is torch.distributed.checkpoint's own plain
pickle: checkpoint/integrity.py reads it with an allow-list first.) checkpoint/io.load and the
streaming reader (dist_io) load inside `weights_only_loads()`.

`weights_only_loads()` makes every `torch.load` inside it weights-only, the explicit
`weights_only=False` ones included, through torch's own switch (TORCH_FORCE_WEIGHTS_ONLY_LOAD),
and allows the numpy types of `np.random.get_state()` (the only non-torch types our checkpoints
hold; audited on CPU checkpoints with and without the distributed optimizer). Wrap a load in it:

    with weights_only_loads():
        state = dist_checkpointing.load(sharded_state, checkpoint_dir)

A pickle that names any other callable then fails with torch's UnpicklingError instead of
running it. NOTE: the switch is an environment variable, i.e. process-wide while the block runs:
a torch.load in another thread meanwhile is weights-only too (stricter, never looser).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np
import torch

_FORCE, _FORCE_NOT = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def numpy_rng_globals() -> list:
    """What unpickling `np.random.get_state()` needs (numpy 1 and 2 module paths)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load in the block uses torch's weights-only unpickler (see the module
    docstring); the environment is restored afterwards."""
    saved = {k: os.environ.get(k) for k in (_FORCE, _FORCE_NOT)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_FORCE_NOT, None)  # both set is an error in torch.load
    try:
        with torch.serialization.safe_globals(numpy_rng_globals()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
