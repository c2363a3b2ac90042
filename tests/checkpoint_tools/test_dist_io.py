"""The streaming torch_dist writer/reader against Megatron's own dist_checkpointing.

- for the same weights, the streamed checkpoint's storage metadata (every key, global shape,
  chunk offsets/sizes, dtype, the `_extra_state` objects) equals what `dist_checkpointing.save`
  writes for the model, and the trainer's loader (`load_model`, strict, config-checked) reads
  it back exactly;
- the writer produces each canonical parameter exactly once (one alive at a time) and the
  reader returns each exactly;
- a bf16 checkpoint loads into a float32 model (the values cast exactly);
- a truncated or missing shard file, or a missing metadata.json, is a CheckpointError naming
  the file.
Exact comparisons: no arithmetic happens on the way.
"""

import json

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from megatron_navil import checkpoint
from megatron_navil.checkpoint import CheckpointError
from megatron_navil.checkpoint.dist_io import DistCheckpointReader, write_dist_checkpoint
from megatron_navil.config import ParallelConfig, PrecisionConfig, get_flavor
from megatron_navil.conversion import hf_to_megatron
from megatron_navil.conversion.layout import canonical_sharded_layout
from megatron_navil.conversion.plan import padded_vocab
from megatron_navil.models.navil import NaViLModel
from megatron_navil.reference import NaViLReference


def _weights(flavor="debug-qwen3", seed=0):
    cfg = get_flavor(flavor)
    ref = NaViLReference(cfg).init_weights_(torch.Generator().manual_seed(seed))
    return cfg, hf_to_megatron(ref.state_dict(), cfg, padded_vocab(cfg))


def _write(root, cfg, weights, dtype=torch.float32, calls=None):
    it = checkpoint.iteration_dir(root, 0)

    def produce(name):
        if calls is not None:
            calls.append(name)
        return weights[name].to(dtype, copy=True)  # the writer owns (and frees) what it gets

    write_dist_checkpoint(it, canonical_sharded_layout(cfg, dtype), produce)
    (it / checkpoint.METADATA).write_text(
        json.dumps({"format_version": 1, "step": 0, "model": cfg.to_dict()})
    )
    (root / checkpoint.LATEST).write_text("0")
    return it


@pytest.mark.processes
def test_streamed_checkpoint_equals_megatron_save(tmp_path, megatron_single_process):
    cfg, weights = _weights()
    calls = []
    it = _write(tmp_path / "ours", cfg, weights, calls=calls)
    assert sorted(calls) == sorted(weights)  # each parameter produced exactly once

    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())
    checkpoint.load_model(tmp_path / "ours", [model], cfg)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())

    checkpoint.save(tmp_path / "megatron", 0, checkpoint.model_sharded_state_dict([model]), cfg)
    ours = FileSystemReader(str(it)).read_metadata().state_dict_metadata
    theirs = (
        FileSystemReader(str(tmp_path / "megatron/iter_0000000"))
        .read_metadata()
        .state_dict_metadata
    )
    assert ours == theirs

    reader = DistCheckpointReader(it)
    back = reader.load(list(weights))
    assert all(torch.equal(back[k], v) for k, v in weights.items())


def test_bf16_checkpoint_loads_into_float32_model(tmp_path, megatron_single_process):
    cfg, weights = _weights("debug-internlm2", seed=1)
    _write(tmp_path, cfg, weights, dtype=torch.bfloat16)
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig(params_dtype="float32"))
    checkpoint.load_model(tmp_path, [model], cfg)
    state = model.state_dict()
    assert all(
        state[k].dtype == torch.float32 and torch.equal(state[k], v.to(torch.bfloat16).float())
        for k, v in weights.items()
    )


def test_damaged_checkpoints_are_named(tmp_path, megatron_single_process):
    cfg, weights = _weights()
    it = _write(tmp_path, cfg, weights)
    shard = it / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"__0_0.distcp is truncated: \d+ bytes, but .* ends at byte"
    ):
        DistCheckpointReader(it)
    shard.unlink()
    with pytest.raises(CheckpointError, match="__0_0.distcp is missing"):
        DistCheckpointReader(it)
    (it / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match="metadata.json is missing or unreadable"):
        DistCheckpointReader(it)
