"""Predicted step time of one layout and micro-batch choice (terms: throughput.py's docstring)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.scaling.inventory import rank_params, stage_layers
from megatron_navil.scaling.layouts import Layout
from megatron_navil.scaling.memory import MicroBatch, trained_parts
from megatron_navil.scaling.spec import ClusterSpec, WorkloadSpec
from megatron_navil.scaling.throughput import ThroughputTable, collective_s
from megatron_navil.training.flop_rules import FlopCount
from megatron_navil.training.flops import BatchCounts, part_counts, window_pairs_estimate


@dataclass
class StepTime:
    """Where the time of one optimizer step goes (seconds)."""

    step_s: float
    """Predicted wall time of the step."""
    micro_batch_s: float
    """The slowest pipeline stage's forward + backward of one micro-batch, communication in."""
    compute_s: float
    """Of which compute (slowest stage)."""
    tp_comm_s: float
    """Of which TP collectives (slowest stage)."""
    ep_comm_s: float
    """Of which the EP all-to-alls (slowest stage)."""
    pp_comm_s: float
    """Of which pipeline send/receive (slowest stage)."""
    bubble_fraction: float
    """(PP - 1) / (micro-batches + PP - 1): the 1F1B pipeline's idle share."""
    dp_exposed_s: float
    """Data-parallel gradient/parameter traffic not hidden behind backward."""
    model_flops: float
    """Model FLOPs of the whole step (fwd + bwd of the trained parts, no recompute: the
    trainer's convention, training/flops.py), for MFU."""
    tokens_per_s: float
    mfu: float

    def to_dict(self) -> dict:
        return asdict(self)


def _bw(cluster: ClusterSpec, span: int) -> float:
    """Bandwidth of a group whose members lie within `span` consecutive ranks."""
    return cluster.intra_node_gbps if span <= cluster.gpus_per_node else cluster.inter_node_gbps


def predict_step(
    cfg: NaViLModelConfig,
    layout: Layout,
    w: WorkloadSpec,
    cluster: ClusterSpec,
    table: ThroughputTable,
    micro_batch_size: int,
    num_microbatches: int,
    recompute: bool,
) -> StepTime:
    tp, pp, ep, dp = layout.tp, layout.pp, layout.ep, layout.dp
    a = w.param_bytes
    mb = MicroBatch.of(cfg, w, micro_batch_size)
    sample = min(w.tokens_per_sample, mb.tokens)
    # The trainer's count (training/flops.py) with this workload's trained parts: a frozen part
    # does no weight-gradient GEMMs, a frozen ViT at the input no backward at all.
    counts = part_counts(
        cfg,
        BatchCounts(
            tokens=mb.tokens,
            visual=mb.visual,
            causal_pairs=mb.tokens * (sample + 1) / 2,
            counted=mb.tokens - mb.visual,
            special=mb.visual > 0,
            patches=mb.patches,
            full_pairs=mb.square_patches,
            window_pairs=window_pairs_estimate(cfg, mb.patches, mb.square_patches),
        ),
        frozenset(trained_parts(w.stage)),
    )
    h, c = cfg.llm.hidden_size, cfg.vision.hidden_size
    bw_tp, bw_ep = _bw(cluster, tp), _bw(cluster, tp * ep)
    bw_pp = _bw(cluster, layout.world)
    # Megatron's rank order is TP fastest, then DP, then PP: a DP group spans TP x DP ranks.
    bw_dp = _bw(cluster, tp * dp)
    coll = 12 if recompute else 8  # TP collectives per layer (recompute repeats the forward's 4)
    split = stage_layers(cfg.llm.num_layers, layout.parallel())
    stages, backward_s = [], []
    for s in range(pp):
        n = len(split[s])
        layers = [counts.layers[i] for i in split[s]]
        flops = sum(_executed(f, recompute) for f in layers)
        compute = flops / tp / (table.tflops("llm", h, tp) * 1e12)
        bwd = sum(f.backward for f in layers) / tp / (table.tflops("llm", h, tp) * 1e12)
        tp_comm = n * coll * collective_s(mb.tokens * h * a, tp, bw_tp)
        ep_comm = n * 4 * (mb.tokens / 2 * h * a / (bw_ep * 1e9)) if ep > 1 else 0.0
        if s == 0 and mb.patches:
            speed = table.tflops("vision", c, tp) * 1e12
            compute += _executed(counts.vision, recompute) / tp / speed
            bwd += counts.vision.backward / tp / speed
            tp_comm += cfg.vision.num_layers * coll * collective_s(mb.patches * c * a, tp, bw_tp)
        if s == pp - 1:
            speed = table.tflops("lm_head", h, tp) * 1e12
            compute += counts.head.total / tp / speed
            bwd += counts.head.backward / tp / speed
        pp_comm = 0.0
        if pp > 1:  # activations forward, their gradients backward, per stage boundary
            pp_comm = 2 * mb.tokens * h * a / (tp if tp > 1 else 1) / (bw_pp * 1e9)
        stages.append((compute + tp_comm + ep_comm + pp_comm, compute, tp_comm, ep_comm, pp_comm))
        backward_s.append(bwd)
    slowest = max(stages)
    m = num_microbatches
    pipeline = (m + pp - 1) * slowest[0]
    # DP: reduce-scatter of the fp32 gradients + all-gather of the updated parameters
    # (distributed optimizer), else an all-reduce of the gradients (twice the data).
    trained = trained_parts(w.stage)
    elems = sum(
        n for part, n in rank_params(cfg, layout.parallel(), 0).by_part.items() if part in trained
    )
    per_gpu = elems * ((4 + a) if w.use_distributed_optimizer else 2 * 4)
    dp_s = collective_s(per_gpu, dp, bw_dp)
    backward = m * backward_s[stages.index(slowest)]
    exposed = max(0.0, dp_s - backward) if w.overlap_grad_reduce else dp_s
    step = pipeline + exposed
    model_flops = counts.total.total * m * dp
    tokens = w.global_batch_size * w.seq_length
    return StepTime(
        step_s=step,
        micro_batch_s=slowest[0],
        compute_s=slowest[1],
        tp_comm_s=slowest[2],
        ep_comm_s=slowest[3],
        pp_comm_s=slowest[4],
        bubble_fraction=(pp - 1) / (m + pp - 1),
        dp_exposed_s=exposed,
        model_flops=model_flops,
        tokens_per_s=tokens / step,
        mfu=model_flops / (step * layout.world * cluster.peak_tflops * 1e12),
    )


def _executed(count: FlopCount, recompute: bool) -> float:
    """FLOPs a component runs: forward + backward, plus the recomputed forward where there is a
    backward to recompute for (a frozen ViT at the input keeps no activations to recompute)."""
    return count.total + (count.forward if recompute and count.backward else 0.0)
