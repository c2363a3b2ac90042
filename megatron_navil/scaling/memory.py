"""Memory per GPU of a training layout: parameters, gradients, optimizer shards, activations.

Static state, per GPU of pipeline stage s (elements from inventory.rank_params):
- parameters: every parameter held, trained or frozen, in the model dtype;
- gradients: Megatron DDP's contiguous buffer, fp32 (`grad_reduce_in_fp32`, training/step.py),
  trained parameters only (a frozen part takes none, training/stages.py);
- optimizer: Adam moments (2 x fp32) plus an fp32 master copy when the model is bf16, trained
  parameters only, divided by the DP size (expert weights: the expert-DP size DP / EP) with the
  distributed optimizer.
Activations of one micro-batch (T = micro_batch_size x seq_length tokens; Tv of them visual,
P = Tv x merge^2 patches, `a` bytes per element), the tensors autograd keeps for backward, with
per-backend coefficients (`COEFFICIENTS`; t = TP, s = TP under sequence parallelism else 1):
- LLM layer, per token: c_h h/s + (c_q q + c_kv kv + c_f f)/t (+ h for the composed output
  projection); the local (pure-torch) attention also keeps k and v repeated to every query
  head, fp32 rotary tables and the probability matrix of every sample (heads/t x len^2).
- vision layer, per patch: c_h C/s + c_s C/t + c_f F/t; local attention keeps heads/t x n^2
  per image.
- connector per merged token 8C + 2D; embeddings h/s per token; the LM head on the counted
  (text) rows: its input h and the logits in the model dtype plus two fp32 copies (the
  cross-entropy's upcast and its saved softmax) of V/t per row.
- full recompute keeps only each layer's input (h/s per token, C/s per patch) and rebuilds one
  layer at a time in backward (+1 layer).
A pipeline stage holds min(PP - s, micro-batches) micro-batches in flight (1F1B), plus one
layer's activations as backward working memory (the gradients flowing through a layer).
Checked against real runs on CPU (tests/scaling/test_memory_measured.py: autograd's saved
tensors and resident memory); prepared for the GPU machine: benchmarks/scaling_gpu_memory.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.config.parallel import ParallelConfig
from megatron_navil.config.training import PARTS, StageConfig
from megatron_navil.scaling.inventory import rank_params, stage_layers
from megatron_navil.scaling.spec import WorkloadSpec


def trained_parts(preset: str) -> tuple[str, ...]:
    """The parts a navil-pretrain stage preset trains (StageConfig decides, one source)."""
    stage = StageConfig(preset=preset)
    return tuple(p for p in PARTS if stage.trains(p))


@dataclass(frozen=True)
class MicroBatch:
    """What one micro-batch holds, from the workload's image mix."""

    tokens: float
    """LLM tokens (micro_batch_size x seq_length)."""
    visual: float
    """Visual LLM tokens."""
    patches: float
    """Vision-encoder patches (visual tokens x merge^2)."""
    square_patches: float
    """Sum over images of n_patches^2 (attention pairs of the encoder)."""
    square_tokens: float
    """Sum over samples of len^2 (attention pairs of the LLM, full square)."""

    @classmethod
    def of(cls, cfg: NaViLModelConfig, w: WorkloadSpec, micro_batch_size: int) -> "MicroBatch":
        tokens = float(micro_batch_size * w.seq_length)
        visual = w.visual_fraction * tokens
        patches = visual * cfg.connector.merge_size**2
        n = min(w.patches_per_image, patches) if patches else 0.0
        sample = min(w.tokens_per_sample, tokens)
        return cls(tokens, visual, patches, patches * n, tokens * sample)

    @classmethod
    def from_batch(cls, cfg: NaViLModelConfig, batch) -> "MicroBatch":
        """The counts of a real packed batch (megatron_navil.batch.NaViLBatch)."""
        lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).double()
        visual = float(cfg.visual_token_mask(batch.tokens).sum())
        patches = square = 0.0
        if batch.grid_thw is not None and batch.grid_thw.numel():
            n = batch.grid_thw.prod(dim=1).double()
            patches, square = float(n.sum()), float((n**2).sum())
        return cls(float(batch.num_tokens), visual, patches, square, float((lens**2).sum()))


@dataclass
class StageMemory:
    """Bytes per GPU of one pipeline stage."""

    stage: int
    parameters: float
    gradients: float
    optimizer: float
    activations_per_micro_batch: float
    """With the chosen recompute."""
    activations_no_recompute: float
    activations_full_recompute: float
    in_flight: int
    """Micro-batches whose activations the stage holds at once."""
    working: float
    """One layer's activations: backward's working memory."""
    vision_static: float
    """Parameters + gradients + optimizer of the vision encoder and connector (stage 0)."""
    vision_activations: float
    """The vision encoder's and connector's activations per micro-batch (chosen recompute)."""
    by_part: dict = field(default_factory=dict)
    """Parameter elements per part on this GPU."""

    @property
    def static(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.static + self.in_flight * self.activations_per_micro_batch + self.working

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(static=self.static, total=self.total)
        return d


@dataclass(frozen=True)
class Coefficients:
    """Elements autograd keeps per token (LLM) or patch (vision) and layer, per backend."""

    llm_hidden: float
    """x h/s: norm inputs (+ the local norms' normalized outputs), QKV and FC1 inputs."""
    llm_query: float
    """x q/t (q = heads x head dim): query, attention output (+ repeated k, v locally)."""
    llm_kv: float
    """x kv/t: key and value (fused attention keeps them unrepeated)."""
    llm_ffn: float
    """x f/t: SwiGLU (Megatron's unfused torch SwiGLU: FC1 output, silu(gate), product...)."""
    vit_hidden: float
    """x C/s: norm inputs (+ normalized outputs), QKV and FC1 inputs, both LayerScale inputs."""
    vit_split: float
    """x C/t: q, k, v, attention output (+ the local attention's transposed copies)."""
    vit_ffn: float
    """x F/t: GELU input and output."""
    qk_norm: float
    """x (q + kv)/t (LLM) or 2C/t (encoder) with q/k norms: their inputs (+ normalized
    outputs)."""
    rope: float
    """x head dim, fp32 rotary tables per token (the local path materialises cos/sin)."""
    probs: bool
    """Attention probability matrices are kept (len^2 per head and sample)."""


COEFFICIENTS = {
    # Measured on CPU with autograd's saved-tensor hooks (tests/scaling/test_memory_measured.py
    # counts them for a real forward; every coefficient matched to within 1%).
    "local": Coefficients(6, 4, 0, 5, 8, 6, 2, 2, 4, True),
    # Fused attention keeps q, k, v, the output and a per-row softmax statistic; fused norms
    # keep their input only; the SwiGLU and GELU stay Megatron's torch ops. Checked on the GPU
    # machine by benchmarks/scaling_gpu_memory.py (max_memory_allocated).
    "transformer_engine": Coefficients(4, 2, 2, 5, 6, 4, 2, 1, 0, False),
}


def _llm_layer(cfg, w, mb: MicroBatch, tp: int, sp: bool, a: int) -> float:
    llm, k = cfg.llm, COEFFICIENTS[w.backend]
    h, f = llm.hidden_size, llm.ffn_hidden_size
    q, kv = llm.num_attention_heads * llm.kv_channels, llm.num_query_groups * llm.kv_channels
    s = tp if sp else 1
    hidden = k.llm_hidden
    if cfg.experts.attention_experts and cfg.experts.output_proj_mode == "composed":
        hidden += 1  # the text projection's output, input of the visual one
    per_token = hidden * h / s + (k.llm_query * q + k.llm_kv * kv + k.llm_ffn * f) / tp
    if llm.qk_layernorm:
        per_token += k.qk_norm * (q + kv) / tp
    elems = per_token * mb.tokens + k.rope * llm.kv_channels * mb.tokens
    if k.probs:
        elems += llm.num_attention_heads / tp * mb.square_tokens
    return elems * a


def _vision_layer(cfg, w, mb: MicroBatch, tp: int, sp: bool, a: int) -> float:
    v, k = cfg.vision, COEFFICIENTS[w.backend]
    c, fv = v.hidden_size, v.ffn_hidden_size
    s = tp if sp else 1
    per_patch = k.vit_hidden * c / s + k.vit_split * c / tp + k.vit_ffn * fv / tp
    if v.qk_normalization:
        per_patch += k.qk_norm * 2 * c / tp
    elems = per_patch * mb.patches + k.rope * v.head_dim * mb.patches
    if k.probs:
        elems += v.num_attention_heads / tp * mb.square_patches
    return elems * a


def _lm_head(cfg, mb: MicroBatch, tp: int, a: int) -> float:
    rows = mb.tokens - mb.visual  # logits only where the loss is counted (text positions)
    return rows * (cfg.llm.hidden_size * a + cfg.llm.vocab_size / tp * (a + 8))


def stage_memory(
    cfg: NaViLModelConfig,
    parallel: ParallelConfig,
    w: WorkloadSpec,
    dp: int,
    stage: int,
    micro_batch_size: int,
    num_microbatches: int,
    recompute: bool,
    micro_batch: MicroBatch | None = None,
) -> StageMemory:
    """Bytes per GPU of pipeline stage `stage` (see the module docstring for every term).
    `micro_batch`: the counts of a real batch instead of the workload's mix."""
    tp, ep = parallel.tensor_model_parallel_size, parallel.expert_model_parallel_size
    pp, sp = parallel.pipeline_model_parallel_size, parallel.sequence_parallel
    pb = w.param_bytes
    a = pb  # activations in the model dtype
    trained = trained_parts(w.stage)
    rp = rank_params(cfg, parallel, stage)
    opt_bytes = 12 if pb == 2 else 8  # (fp32 master +) Adam m, v
    shard_dense = dp if w.use_distributed_optimizer else 1
    shard_expert = max(dp // ep, 1) if w.use_distributed_optimizer else 1
    params = sum(rp.by_part.values()) * pb
    grads = sum(n for part, n in rp.by_part.items() if part in trained) * 4
    opt = sum(n for part, n in rp.dense.items() if part in trained) * opt_bytes / shard_dense
    opt += sum(n for part, n in rp.expert.items() if part in trained) * opt_bytes / shard_expert

    mb = micro_batch or MicroBatch.of(cfg, w, micro_batch_size)
    s = tp if sp else 1
    n_layers = len(stage_layers(cfg.llm.num_layers, parallel)[stage])
    llm_layer = _llm_layer(cfg, w, mb, tp, sp, a)
    llm_input = mb.tokens * cfg.llm.hidden_size / s * a
    act_none = n_layers * llm_layer
    act_full = n_layers * llm_input
    working = llm_layer if n_layers else 0.0
    vis_none = vis_full = 0.0
    vision_static = 0.0
    if stage == 0:
        v = cfg.vision
        vit_layer = _vision_layer(cfg, w, mb, tp, sp, a)
        merged = mb.patches / cfg.connector.merge_size**2
        connector = merged * (8 * v.hidden_size + 2 * cfg.llm.hidden_size) * a
        vis_none = v.num_layers * vit_layer + connector
        vis_full = v.num_layers * mb.patches * v.hidden_size / s * a + connector
        embed = llm_input
        act_none += vis_none + embed
        act_full += vis_full + embed
        working = max(working, vit_layer)
        for part in ("vision", "connector"):
            n = rp.by_part.get(part, 0.0)
            vision_static += n * pb
            if part in trained:
                vision_static += n * 4 + n * opt_bytes / shard_dense
    if stage == pp - 1:
        head = _lm_head(cfg, mb, tp, a)
        act_none += head
        act_full += head
    in_flight = min(pp - stage, num_microbatches) if pp > 1 else 1
    return StageMemory(
        stage=stage,
        parameters=params,
        gradients=grads,
        optimizer=opt,
        activations_per_micro_batch=act_full if recompute else act_none,
        activations_no_recompute=act_none,
        activations_full_recompute=act_full,
        in_flight=in_flight,
        working=working,
        vision_static=vision_static,
        vision_activations=vis_full if recompute else vis_none,
        by_part=dict(rp.by_part),
    )


def layout_memory(
    cfg: NaViLModelConfig,
    parallel: ParallelConfig,
    w: WorkloadSpec,
    dp: int,
    micro_batch_size: int,
    num_microbatches: int,
    recompute: bool,
) -> list[StageMemory]:
    """StageMemory of every pipeline stage (the largest decides whether a layout fits)."""
    return [
        stage_memory(cfg, parallel, w, dp, s, micro_batch_size, num_microbatches, recompute)
        for s in range(parallel.pipeline_model_parallel_size)
    ]
