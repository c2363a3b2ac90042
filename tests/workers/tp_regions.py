"""Worker: every TPRegion crossing at TP=2 against plain torch.distributed collectives.

Runs WITHOUT Megatron's parallel_state (never initialised here): the region's group is a group
made by this worker, so any fallback to Megatron's global TP group would raise. For each
method, with and without sequence parallelism, the forward output and the input gradient
(for a random upstream gradient) are compared exactly with what the collective the docstring
of models/tp_regions.py names gives. The language model's sync-free vocab-parallel embedding is
compared exactly with Megatron's. Writes one JSON line per rank: {"checked": [...]}.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist


def _gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


def _chunk(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)]


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    return _chunk(_reduce(x, group), group, 0)


def _run(fn, x: torch.Tensor, grad_out_shape, seed: int):
    """(fn(x), d sum(fn(x) * g) / dx, g) for a random upstream gradient g drawn from `seed`."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    g = torch.randn(grad_out_shape, generator=torch.Generator().manual_seed(seed))
    (y * g).sum().backward()
    return y.detach(), x.grad, g


def _check_embedding(group) -> str:
    """The language model's sync-free vocab-parallel embedding == Megatron's, bit for bit:
    output and weight gradient, with ids on both ranks' vocab slices."""
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
    from megatron.core.transformer import TransformerConfig

    from megatron_navil.models.language import SyncFreeVocabParallelEmbedding

    config = TransformerConfig(
        num_layers=1, hidden_size=6, num_attention_heads=1, use_cpu_initialization=True
    )
    ids = torch.randint(0, 16, (1, 12), generator=torch.Generator().manual_seed(3))
    outs = []
    for cls in (VocabParallelEmbedding, SyncFreeVocabParallelEmbedding):
        torch.manual_seed(4)  # the same weights for both
        emb = cls(16, 6, init_method=config.init_method, config=config, tp_group=group)
        y = emb(ids)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5 + dist.get_rank()))
        (y * g).sum().backward()
        outs.append((y.detach(), emb.weight.grad))
    (y0, g0), (y1, g1) = outs
    assert torch.equal(y0, y1) and torch.equal(g0, g1), "vocab-parallel embedding"
    assert bool((g1 == 0).all(dim=1).any()) and bool(g1.abs().sum() > 0)  # both cases ran
    return "embedding"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    out = p.parse_args().out

    from megatron_navil.utils import cpu_compat
    from megatron_navil.utils.distributed import init_process_group

    cpu_compat.activate()  # this worker is an entry point (utils/cpu_compat.py)
    init_process_group()
    from megatron.core import parallel_state

    from megatron_navil.models.tp_regions import TPRegion

    assert not parallel_state.model_parallel_is_initialized()
    group = dist.new_group([0, 1])
    rank = dist.get_rank(group)
    s, b, h = 8, 1, 6
    # the same full tensor on both ranks; each rank's own "local" inputs differ by rank
    full = torch.randn(s, b, h, generator=torch.Generator().manual_seed(0))
    local = full + rank  # replicated input (no SP) or partial sums: different per rank
    chunk = _chunk(full, group, 0) + rank  # this rank's SP chunk
    checked = []

    class Cfg:
        sequence_parallel = False

    for sp in (False, True):
        Cfg.sequence_parallel = sp
        region = TPRegion.of(Cfg, group)
        assert region.sequence_parallel is sp and region.size == 2 and region.rank == rank
        seed = 10 + rank  # upstream gradients differ per rank, as partial sums would
        # enter_column: SP all-gathers (backward reduce-scatters), else copy (backward all-reduce)
        x = chunk if sp else local
        y, dx, g = _run(region.enter_column, x, (s, b, h), seed)
        want_y = _gather(x, group, 0) if sp else x
        want_dx = _reduce_scatter(g, group) if sp else _reduce(g, group)
        assert torch.equal(y, want_y) and torch.equal(dx, want_dx), ("enter_column", sp)
        # exit_row: SP reduce-scatters (backward all-gathers), else all-reduce (backward copy)
        y, dx, g = _run(region.exit_row, local, (s // 2, b, h) if sp else (s, b, h), seed)
        want_y = _reduce_scatter(local, group) if sp else _reduce(local, group)
        want_dx = _gather(g, group, 0) if sp else g
        assert torch.equal(y, want_y) and torch.equal(dx, want_dx), ("exit_row", sp)
        # scatter_sequence / gather_sequence: identity without SP
        y, dx, g = _run(region.scatter_sequence, full, (s // 2, b, h) if sp else (s, b, h), seed)
        assert torch.equal(y, _chunk(full, group, 0) if sp else full), ("scatter_sequence", sp)
        assert torch.equal(dx, _gather(g, group, 0) if sp else g), ("scatter_sequence", sp)
        for partial in (True, False):
            x = chunk if sp else full
            y, dx, g = _run(
                lambda t: region.gather_sequence(t, grad_is_partial=partial), x, (s, b, h), seed
            )
            assert torch.equal(y, _gather(x, group, 0) if sp else x), ("gather_sequence", sp)
            if not sp:
                want_dx = g
            else:
                want_dx = _reduce_scatter(g, group) if partial else _chunk(g, group, 0)
            assert torch.equal(dx, want_dx), ("gather_sequence", sp, partial)
        # the composed projection's pieces and the logits gather ignore SP
        y, dx, g = _run(region.all_reduce, local, (s, b, h), seed)
        assert torch.equal(y, _reduce(local, group)) and torch.equal(dx, g), ("all_reduce", sp)
        y, dx, g = _run(region.split_last_dim, full, (s, b, h // 2), seed)
        assert torch.equal(y, _chunk(full, group, 2)), ("split_last_dim", sp)
        assert torch.equal(dx, _gather(g, group, 2)), ("split_last_dim", sp)
        y, dx, g = _run(region.gather_last_dim, local, (s, b, 2 * h), seed)
        assert torch.equal(y, _gather(local, group, 2)), ("gather_last_dim", sp)
        assert torch.equal(dx, _chunk(g, group, 2)), ("gather_last_dim", sp)
        checked.append(f"sp={sp}")

    # Vocab-parallel cross entropy over the region's group == plain CE on the full logits.
    vocab, n = 10, 5
    logits = torch.randn(n, 1, vocab, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(2))
    mine = _chunk(logits, group, 2).clone().requires_grad_(True)
    loss = region.cross_entropy(mine, target)
    loss.sum().backward()
    ref_logits = logits.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_logits[:, 0], target[:, 0], reduction="none")
    ref.sum().backward()
    # different summation orders (split softmax denominators): a few float32 ulps
    torch.testing.assert_close(loss[:, 0], ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mine.grad, _chunk(ref_logits.grad, group, 2), rtol=1e-6, atol=1e-6)
    checked.append("cross_entropy")

    checked.append(_check_embedding(group))

    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump({"checked": checked}, f)
    assert not parallel_state.model_parallel_is_initialized()
    dist.destroy_process_group()
    cpu_compat.deactivate()


if __name__ == "__main__":
    main()
