"""Checkpoint loads unpickle weights-only (megatron_navil/checkpoint/safe_load.py).

A torch_dist checkpoint is saved with Megatron's dist_checkpointing.save holding what ours hold
besides tensors (the RNG state as a ShardedObject, a loader state in the common part) plus a
hostile ShardedObject and a hostile common entry, each of which pickles as a call to os.mkdir
of a marker directory. Proves: inside `weights_only_loads()` the RNG state and the loader state
load exactly, while loading either hostile entry fails and never runs the call, also when the
user has set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD; outside it, Megatron's load of the ShardedObject
does run it (torch.distributed.checkpoint reads ShardedObject bytes with weights_only=False),
which is why checkpoint loads must be wrapped; `megatron_navil.checkpoint.load` is, and refuses
the hostile object with a CheckpointError.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_navil.checkpoint.safe_load import weights_only_loads

pytestmark = pytest.mark.processes  # the torch_dist writer starts helper processes
# torch.distributed.checkpoint wraps a rank's failure in CheckpointException (a BaseException)
REFUSED = (Exception, CheckpointException)


class _Mkdir:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _save(d, marker_obj=None, marker_common=None):
    """Save a checkpoint: RNG state + loader state, plus a hostile ShardedObject or a hostile
    common entry (the common part is read whole by every load, so they go apart)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_navil.training.state import rng_state

    np.random.seed(3)
    state = {
        "rng_state": ShardedObject("rng_state", rng_state(), (1,), (0,), replica_id=0),
        "data": {"version": 1, "epoch": 2, "position": 5, "fingerprint": "ab12"},
    }
    if marker_obj is not None:
        state["hostile"] = ShardedObject("hostile", _Mkdir(marker_obj), (1,), (0,), replica_id=0)
    if marker_common is not None:
        state["evil_common"] = {"x": _Mkdir(marker_common)}
    d.mkdir()
    dist_checkpointing.save(state, str(d))
    return state


def _request(state, *keys):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    out = {}
    for k in keys:
        v = state[k]
        out[k] = (
            ShardedObject(v.key, None, v.global_shape, v.global_offset, replica_id=0)
            if (isinstance(v, ShardedObject))
            else v
        )
    return out


def test_checkpoint_pickles_load_weights_only(tmp_path, megatron_single_process, monkeypatch):
    from megatron.core import dist_checkpointing

    obj_marker, common_marker = tmp_path / "pwned_object", tmp_path / "pwned_common"
    d, d_common = tmp_path / "ck", tmp_path / "ck_common"
    saved = _save(d, marker_obj=obj_marker)
    _save(d_common, marker_common=common_marker)
    assert not obj_marker.exists() and not common_marker.exists()

    with weights_only_loads():
        got = dist_checkpointing.load(_request(saved, "rng_state"), str(d))
    want = saved["rng_state"].data
    assert got["rng_state"]["random"] == want["random"]
    assert np.array_equal(got["rng_state"]["numpy"][1], want["numpy"][1])
    assert torch.equal(got["rng_state"]["torch"], want["torch"])
    assert got["data"] == saved["data"]

    with weights_only_loads(), pytest.raises(REFUSED) as e:
        dist_checkpointing.load(_request(saved, "hostile"), str(d))
    assert "mkdir" in str(e.value) or "weights_only" in str(e.value), str(e.value)[:500]
    assert not obj_marker.exists()

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a user's override is beaten
    with weights_only_loads(), pytest.raises(REFUSED):
        dist_checkpointing.load(_request(saved, "rng_state"), str(d_common))
    assert not common_marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # restored after the block
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")

    # Why the wrapper exists: Megatron's own load runs the ShardedObject's pickle.
    dist_checkpointing.load(_request(saved, "hostile"), str(d))
    assert obj_marker.is_dir()


def test_navil_checkpoint_load_refuses_a_hostile_object(tmp_path, megatron_single_process):
    """The wrapper is in place where the trainer (and every tool) loads: checkpoint.load
    refuses the hostile ShardedObject with a CheckpointError naming the checkpoint, unrun."""
    import json

    from megatron_navil import checkpoint

    marker, d = tmp_path / "pwned", tmp_path / "iter_0000001"
    saved = _save(d, marker_obj=marker)
    (d / checkpoint.METADATA).write_text(json.dumps({"format_version": 1, "step": 1}))
    with pytest.raises(checkpoint.CheckpointError, match=f"cannot load {d}"):
        checkpoint.load(d, _request(saved, "hostile"))
    assert not marker.exists()
