"""Worker (one rank of a torchrun-style job): load a converted checkpoint at a TP/PP/EP layout.

1. builds the NaViL Megatron model at the requested layout and loads the checkpoint with the
   trainer's loader (checkpoint.load_model, model-config check included);
2. checks every local parameter against the registry's TP split of the canonical tensor (read
   from the same checkpoint): `TPSplit.shard(canonical, rank, tp)` must equal what the rank
   holds (global layer / expert index from the model itself);
3. runs one packed batch through Megatron's pipeline schedule (forward only) and keeps the
   last stage's logits;
4. saves the model again at this layout with checkpoint.save (collective).
Writes `{out}.rank{r}.pt`: {"logits", "rows"} (last stage) and the split mismatches.
"""

from __future__ import annotations

import argparse
import re

import torch


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("--load", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resave", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    return p.parse_args()


def canonical_name(local: str, model) -> tuple[str, bool]:
    """(canonical name, is_expert) of a local parameter name of one pipeline stage."""
    from megatron.core import parallel_state

    m = re.match(r"^(language_model\.decoder\.layers)\.(\d+)\.(.*)$", local)
    if not m:
        return local, False
    layer = model.language_model.decoder.layers[int(m.group(2))].layer_number - 1
    rest = m.group(3)
    e = re.match(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$", rest)
    if e:
        n_local = len(model.language_model.decoder.layers[0].mlp.experts.local_experts)
        expert = parallel_state.get_expert_model_parallel_rank() * n_local + int(e.group(1))
        return f"{m.group(1)}.{layer}.mlp.experts.local_experts.{expert}.{e.group(2)}", True
    return f"{m.group(1)}.{layer}.{rest}", False


def check_splits(model, cfg, load_dir) -> list[str]:
    from megatron.core import parallel_state as ps

    from megatron_navil.checkpoint import resolve
    from megatron_navil.checkpoint.dist_io import DistCheckpointReader
    from megatron_navil.conversion.plan import pairs

    reader = DistCheckpointReader(resolve(load_dir))
    by_name = {p.megatron: p for p in pairs(cfg)}
    bad = []
    for local, param in model.named_parameters():
        name, expert = canonical_name(local, model)
        tp = (
            ps.get_expert_tensor_parallel_world_size()
            if expert
            else ps.get_tensor_model_parallel_world_size()
        )
        rank = (
            ps.get_expert_tensor_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
        )
        want = by_name[name].tp.shard(reader.load([name])[name], rank, tp)
        if want.shape != param.shape or not torch.equal(want, param.detach()):
            bad.append(f"{local} -> {name}")
    return bad


def main():
    a = _args()
    from megatron_navil.utils import cpu_compat

    cpu_compat.activate()  # this worker is a job's entry point; destroy() below turns it off
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_navil import checkpoint
    from megatron_navil.config import NaViLModelConfig, ParallelConfig, PrecisionConfig
    from megatron_navil.models.navil import build_model
    from megatron_navil.utils.distributed import destroy, initialize_model_parallel

    par = ParallelConfig(
        tensor_model_parallel_size=a.tp,
        pipeline_model_parallel_size=a.pp,
        expert_model_parallel_size=a.ep,
        sequence_parallel=a.tp > 1,
    )
    initialize_model_parallel(par, seed=7)
    cfg = NaViLModelConfig.from_dict(checkpoint.read_metadata(a.load)["model"])
    chunks = build_model(cfg, par, PrecisionConfig())
    checkpoint.load_model(a.load, chunks, cfg)
    model = chunks[0]
    result = {"bad_splits": check_splits(model, cfg, a.load), "logits": None, "rows": None}

    batch = torch.load(a.inputs, weights_only=True)
    collected = []

    def forward_step(data_iterator, m):
        b = next(data_iterator)
        out = m(
            b["tokens"],
            b["position_ids"],
            b["cu_seqlens"],
            pixel_values=b["pixel_values"],
            grid_thw=b["grid_thw"],
        )

        def loss_func(output):
            logits, rows = output
            collected.append((logits.detach().clone(), rows.clone()))
            zero = logits.sum() * 0.0
            return zero, torch.tensor(1, dtype=torch.int), {}

        return out, loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=model,
            num_microbatches=1,
            seq_length=batch["tokens"].numel(),
            micro_batch_size=1,
            forward_only=True,
        )
    if parallel_state.is_pipeline_last_stage() and collected:
        result["logits"], result["rows"] = collected[0]
    checkpoint.save(a.resave, 3, checkpoint.model_sharded_state_dict(chunks), cfg)
    torch.save(result, f"{a.out}.rank{torch.distributed.get_rank()}.pt")
    destroy()


if __name__ == "__main__":
    main()
