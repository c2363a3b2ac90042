"""The modality-expert LLM: embeddings (+ special tokens, + vision features), decoder, LM head.

input_ids [T]
  -> VocabParallelEmbedding                              [T, 1, D]  (all-reduced over TP)
  -> rows of special-token ids <- special_token_embedding (12 rows, NaViL's override)
  -> rows of <IMG_CONTEXT> <- connector outputs, in order (count mismatch: ValueError)
  -> scatter to sequence-parallel chunks (SP)            [T/tp, 1, D]
  -> decoder: L x (shared RMSNorm, MHA-MMoE, shared RMSNorm, FFN-MMoE), final RMSNorm
  -> gather (SP); keep only rows that need logits (never <IMG_CONTEXT> inputs)
  -> LM head (column-parallel over the padded vocab; padded columns masked to -inf)
  -> vocab-parallel cross entropy (training) or gathered logits (inference)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.utils import VocabUtility
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.utils import get_pg_rank

from megatron_navil.config.model import SPECIAL_TOKENS, NaViLModelConfig, padded_vocab_size
from megatron_navil.geometry.rope import rope_1d
from megatron_navil.models.backends import Backend
from megatron_navil.models.head_loss import chunked_head_cross_entropy
from megatron_navil.models.layer import NaViLTransformerBlock
from megatron_navil.models.modality import ModalityRouting
from megatron_navil.models.specs import block_submodules, llm_layer_spec
from megatron_navil.models.tp_regions import TPRegion


class NaViLLanguageModel(MegatronModule):
    """This pipeline stage's share of the modality-expert LLM (flow in the module docstring).

    The first stage (`pre_process`) owns the embeddings and `embed`, the last
    (`post_process`) the LM head and the loss; every stage owns its decoder layers, counted by
    Megatron from the pipeline rank in `pg_collection` (the model's collection: every group
    used here comes from it). The vocabulary is padded independently of TP (config/model.py),
    and padded logits are masked to -inf.
    """

    def __init__(
        self,
        cfg: NaViLModelConfig,
        config,
        backend: Backend,
        pre_process: bool,
        post_process: bool,
        pg_collection: ProcessGroupCollection,
        vp_stage: Optional[int] = None,
        head_loss_chunk: int = 0,
    ):
        """`head_loss_chunk`: loss rows per chunk of the fused LM head + cross entropy
        (models/head_loss.py, precision.lm_head_loss_chunk_rows); 0 = the plain path."""
        super().__init__(config=config)
        self.cfg = cfg
        self.head_loss_chunk = head_loss_chunk
        self.pre_process, self.post_process = pre_process, post_process
        self.tp_group = pg_collection.tp
        self.tp_region = TPRegion.of(config, self.tp_group)
        tp = self.tp_region.size
        self.vocab_size = cfg.llm.vocab_size
        self.padded_vocab_size = padded_vocab_size(
            cfg.llm.vocab_size, cfg.llm.make_vocab_size_divisible_by, tp
        )
        d = cfg.llm.hidden_size
        if pre_process:
            self.embedding = SyncFreeVocabParallelEmbedding(
                self.padded_vocab_size,
                d,
                init_method=config.init_method,
                config=config,
                reduce_scatter_embeddings=False,
                tp_group=self.tp_group,
            )
            self.special_token_embedding = torch.nn.Embedding(
                len(SPECIAL_TOKENS),
                d,
                dtype=config.params_dtype,
                device=None if config.use_cpu_initialization else torch.cuda.current_device(),
            )
            with torch.no_grad():
                config.init_method(self.special_token_embedding.weight)
        num_layers = get_num_layers_to_build(config, vp_stage, get_pg_rank(pg_collection.pp))
        self.decoder = NaViLTransformerBlock(
            config,
            block_submodules(llm_layer_spec(cfg, backend), num_layers, backend.rms_norm),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        if post_process:
            # We gather the sequence ourselves (SP) and pick the rows that need logits before the
            # LM head, so the head runs without its own SP handling; with SP the gather's
            # backward already reduces the input gradient, hence disable_grad_reduce.
            head_config = _without_sequence_parallel(config)
            self.output_layer = ColumnParallelLinear(
                d,
                self.padded_vocab_size,
                config=head_config,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
                skip_bias_add=False,
                disable_grad_reduce=self.tp_region.sequence_parallel,
                tp_group=self.tp_group,
            )

    # ------------------------------------------------------------------ first stage
    def embed(
        self,
        input_ids: torch.Tensor,
        vision_embeds: Optional[torch.Tensor],
        image_slots: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """input_ids [T] -> [T (/tp under SP), 1, D] with special tokens and vision features.

        `image_slots`: positions of the <IMG_CONTEXT> tokens (pack_meta.py); None finds them
        here (a nonzero: one host sync)."""
        x = self.embedding(input_ids[None, :]).transpose(0, 1)  # [1, T, D] -> [T, 1, D]
        first = self.cfg.llm.first_special_token_id
        rows = input_ids - first
        is_special = (rows >= 0) & (rows < len(SPECIAL_TOKENS))
        special = self.special_token_embedding(rows.clamp(0, len(SPECIAL_TOKENS) - 1))
        x = torch.where(is_special[:, None, None], special[:, None, :].to(x.dtype), x)

        slots = image_slots
        if slots is None:
            slots = (input_ids == self.cfg.img_context_id).nonzero().squeeze(1)
        n_feat = 0 if vision_embeds is None else vision_embeds.shape[0]
        if slots.numel() != n_feat:
            raise ValueError(
                f"the token sequence has {slots.numel()} <IMG_CONTEXT> placeholders but the "
                f"vision encoder produced {n_feat} visual tokens; the image token layout must "
                "match the images' grids (one <IMG_CONTEXT> per merged 2x2 patch block)"
            )
        if n_feat:
            x = x.index_copy(0, slots, vision_embeds.to(x.dtype)[:, None, :])
        return self.tp_region.scatter_sequence(x)  # [T, 1, D] -> [T / tp, 1, D] (SP)

    # ------------------------------------------------------------------ all stages
    def forward(
        self,
        hidden: Optional[torch.Tensor],
        *,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        packed_seq_params: PackedSeqParams,
        routing: ModalityRouting,
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        head_rows: Optional[torch.Tensor] = None,
    ):
        """`head_rows`: the positions whose hidden states go through the LM head (pack_meta.py):
        those that take loss with `labels`, every non-<IMG_CONTEXT> one without. None finds them
        here (a nonzero: one host sync)."""
        freqs = rope_1d(position_ids, self.cfg.llm.kv_channels, self.cfg.llm.rope_theta)
        h = self.decoder(
            hidden, rotary_freqs=freqs, packed_seq_params=packed_seq_params, routing=routing
        )
        if not self.post_process:
            return h
        h = self.tp_region.gather_sequence(h)  # [T / tp, 1, D] -> [T, 1, D] (SP)
        not_image = input_ids != self.cfg.img_context_id
        if labels is None:
            rows = head_rows if head_rows is not None else not_image.nonzero().squeeze(1)
            logits = self._logits(h.index_select(0, rows))  # [n, 1, V / tp]
            return self.tp_region.gather_last_dim(logits)[:, 0], rows
        weights = (
            torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()
        )
        rows = head_rows
        if rows is None:
            rows = ((weights != 0) & not_image).nonzero().squeeze(1)
        target = labels.index_select(0, rows)
        if self.head_loss_chunk:
            ce = self._chunked_loss(h.index_select(0, rows)[:, 0], target)
        else:
            logits = self._logits(h.index_select(0, rows)).float()  # [n, 1, V/tp]
            ce = self.tp_region.cross_entropy(logits, target[:, None])[:, 0]
        # Per-position weighted loss over the whole pack (0 where no loss is taken).
        return torch.zeros_like(weights).index_copy(0, rows, ce * weights.index_select(0, rows))

    def _chunked_loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-row loss through models/head_loss.py: the LM head's own region crossing first
        (as the ColumnParallelLinear does: its input gradient is all-reduced over TP, except
        under SP, where the sequence gather's backward already reduces it)."""
        if not self.tp_region.sequence_parallel:
            x = self.tp_region.enter_column(x)
        return chunked_head_cross_entropy(
            x,
            self.output_layer.weight,
            target,
            self.tp_region,
            self.vocab_size,
            self.head_loss_chunk,
        )

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(h)  # [n, 1, V_padded / tp]
        if self.padded_vocab_size == self.vocab_size:
            return logits
        # Padded vocab rows are not tokens: give them zero probability.
        tp, rank = self.tp_region.size, self.tp_region.rank
        start, _ = VocabUtility.vocab_range_from_global_vocab_size(self.padded_vocab_size, rank, tp)
        cols = torch.arange(logits.shape[-1], device=logits.device) + start
        return logits.masked_fill(cols >= self.vocab_size, float("-inf"))


class SyncFreeVocabParallelEmbedding(VocabParallelEmbedding):
    """Megatron's VocabParallelEmbedding, the same values, with `masked_fill_` where it assigns
    through a boolean mask under TP > 1: `x[mask] = 0` is an index_put with a boolean index,
    which runs a nonzero (a host sync on a GPU) twice in forward and once in backward, every
    micro-batch. tests/workers/tp_regions.py compares the two bit for bit at TP = 2."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size() == 1 or self.reduce_scatter_embeddings:
            return super().forward(input_)  # no mask (TP = 1), or a layout we never build
        # ids outside this rank's vocab slice look up row 0 and are zeroed after the lookup
        input_mask = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
        masked_input = (input_.clone() - self.vocab_start_index).masked_fill_(input_mask, 0)
        if self.deterministic_mode:
            output_parallel = self.weight[masked_input]
        else:
            output_parallel = F.embedding(masked_input, self.weight)
        output_parallel.masked_fill_(input_mask[..., None], 0.0)  # [b, s, h]
        return reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)


def _without_sequence_parallel(config):
    import copy

    from megatron.core.tensor_parallel.layers import _grad_accum_fusion_available

    out = copy.copy(config)
    out.sequence_parallel = False
    # The head is Megatron's own linear, whose fused wgrad needs apex's CUDA extension (TE's
    # linears elsewhere do not): without apex the head accumulates unfused.
    out.gradient_accumulation_fusion = (
        config.gradient_accumulation_fusion and _grad_accum_fusion_available
    )
    return out
