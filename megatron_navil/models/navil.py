"""NaViL on Megatron-Core: vision encoder + connector + modality-expert LLM.

    first pipeline stage                                  every stage            last stage
    ----------------------------------------------------  ---------------------  -----------------
    pixel_values, grid_thw -> VisionEncoder -> Connector
                                                   |
    tokens -> embed (+special, +vision at <IMG_CONTEXT>) -> decoder layers     -> norm, LM head,
                                                            (this stage's)        text-only CE
    The modality routing (visual iff <IMG_CONTEXT> or <img>) is built from the tokens on EVERY
    stage for every micro-batch and passed down explicitly.

One instance is one pipeline stage (one virtual chunk with interleaving); `pre_process` /
`post_process` say whether it holds the first / last layers.

Process groups: one ProcessGroupCollection per model, made once by `build_model` (or by
`NaViLModel` when built alone) and passed down to the vision encoder, the language model, its
layers, attention, MoE and modality linears. `default_process_groups` is the only place under
models/ that reads Megatron's parallel_state (tests/models/test_process_groups.py checks).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_navil.batch import check_packed_sequence, check_packed_shapes
from megatron_navil.config.base import ConfigError
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.config.parallel import ParallelConfig, PrecisionConfig
from megatron_navil.models.backends import get_backend, resolve_backend, use_grouped_experts
from megatron_navil.models.fp8 import check_device_fp8
from megatron_navil.models.language import NaViLLanguageModel
from megatron_navil.models.modality import ModalityRouting
from megatron_navil.models.packing import packed_params, thd_params
from megatron_navil.models.tp_regions import TPRegion
from megatron_navil.models.transformer_config import (
    llm_transformer_config,
    vision_transformer_config,
)
from megatron_navil.models.vision import Connector, VisionEncoder
from megatron_navil.pack_meta import PackMeta, VisionMeta


def default_process_groups() -> ProcessGroupCollection:
    """Megatron's global groups (parallel_state) as one collection, for a caller that passes
    none; the only read of parallel_state under models/."""
    return ProcessGroupCollection.use_mpu_process_groups()


class NaViLModel(MegatronModule):
    """One pipeline stage of NaViL.

    `experts_trainable` (text FFN expert, visual FFN expert): whether the training stage trains
    each; it picks the TE experts module (backends.use_grouped_experts). `vision_every_micro_batch`:
    in training, run the vision encoder and connector even on packs without images (on one blank
    merge block, contributing exactly 0), so every trainable parameter gets a gradient on every
    micro-batch, as Megatron DDP's overlapped grad reduce requires. `pg_collection`: the
    model's process groups (None: `default_process_groups()`).
    """

    def __init__(
        self,
        cfg: NaViLModelConfig,
        parallel: ParallelConfig,
        precision: PrecisionConfig,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        experts_trainable: tuple[bool, bool] = (True, True),
        vision_every_micro_batch: bool = False,
    ):
        cfg.validate()
        parallel.validate()
        precision.validate()
        backend_name = resolve_backend(precision)
        if backend_name == "transformer_engine":
            check_device_fp8(precision.fp8)
        elif precision.fp8 is not None:
            raise ConfigError(
                f"precision.fp8={precision.fp8} needs the Transformer Engine backend "
                "on a GPU, but this run resolved to the local backend (see the "
                "warning above, if any); drop --fp8-recipe or install TE"
            )
        grouped = use_grouped_experts(backend_name, experts_trainable)
        backend = get_backend(
            backend_name, row_multiple=precision.row_multiple(), grouped_experts=grouped
        )
        super().__init__(
            config=llm_transformer_config(
                cfg, parallel, precision, backend_name, grouped_experts=grouped
            )
        )
        if pg_collection is None:
            pg_collection = default_process_groups()
        self.cfg, self.backend = cfg, backend
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.tp_region = TPRegion.of(self.config, self.tp_group)
        if pre_process:
            vit_config = vision_transformer_config(cfg, parallel, precision, backend_name)
            self.vision_model = VisionEncoder(cfg, vit_config, backend, pg_collection)
            self.connector = Connector(cfg, vit_config)
        self.language_model = NaViLLanguageModel(
            cfg,
            self.config,
            backend,
            pre_process,
            post_process,
            pg_collection,
            vp_stage,
            head_loss_chunk=precision.lm_head_loss_chunk_rows,
        )
        self.vision_every_micro_batch = vision_every_micro_batch
        # device -> (grid_thw, VisionMeta) of the blank image (_blank_image_features)
        self._blank_meta: dict[str, tuple[torch.Tensor, VisionMeta]] = {}
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules
        self.share_embeddings_and_output_weights = False  # NaViL's LM head is untied

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's output here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.language_model.decoder.set_input_tensor(input_tensor)

    def routing(
        self,
        tokens: torch.Tensor,
        modality_mask: Optional[torch.Tensor] = None,
        num_visual: Optional[int] = None,
    ) -> ModalityRouting:
        if modality_mask is None:
            modality_mask = self.cfg.visual_token_mask(tokens)
        sp_size, sp_rank = self.tp_region.sequence_chunk
        return ModalityRouting.build(
            modality_mask,
            row_multiple=self.backend.fp8_row_multiple,
            sp_size=sp_size,
            sp_rank=sp_rank,
            num_visual=num_visual,
        )

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        grid_thw: Optional[torch.Tensor] = None,
        modality_mask: Optional[torch.Tensor] = None,
        pack_meta: Optional[PackMeta] = None,
    ):
        """One packed micro-batch (see megatron_navil/batch.py for the field contract).

        `pack_meta`: the pack's host-side metadata on the batch's device (pack_meta.py, made by
        the loader); with it the forward reads no device tensor on the host. None: the same
        values are computed here from the tensors (a few host syncs per micro-batch).

        Returns, on the last stage: the per-position weighted loss [T] when `labels` are given,
        else (logits [n, vocab], row indices of the n positions that got logits). On other
        stages: the hidden states for the next stage.
        """
        tokens, position_ids = tokens.reshape(-1), position_ids.reshape(-1)
        meta = pack_meta
        if meta is None:
            check_packed_sequence(self.cfg, tokens, position_ids, cu_seqlens)
            seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            packed = packed_params(seqlens, tokens.device)
        else:  # the loader checked the values (PackMeta.build); shapes cost no device read
            check_packed_shapes(self.cfg, tokens, position_ids, cu_seqlens)
            meta.check_matches(tokens.numel(), cu_seqlens.numel())
            cu = cu_seqlens.to(torch.int32)  # a no-op for the loader's int32 offsets
            packed = thd_params(cu, meta.host_cu_seqlens, meta.max_seqlen)
        routing = self.routing(tokens, modality_mask, None if meta is None else meta.num_visual)
        hidden = None
        if self.pre_process:
            vision = blank = None
            if pixel_values is not None and pixel_values.shape[0] > 0:
                vision_meta = None if meta is None else meta.vision
                vision = self.connector(self.vision_model(pixel_values, grid_thw, vision_meta))
            elif self.vision_every_micro_batch and self.training and torch.is_grad_enabled():
                # same module order as packs with images
                blank = self._blank_image_features(tokens.device, host_meta=meta is not None)
            slots = None if meta is None else meta.image_slots
            hidden = self.language_model.embed(tokens, vision, slots)
            if blank is not None:
                # exactly 0 added; the encoder's parameters get (zero) gradients like on any pack
                hidden = hidden + 0.0 * blank.sum()
        return self.language_model(
            hidden,
            input_ids=tokens,
            position_ids=position_ids,
            packed_seq_params=packed,
            routing=routing,
            labels=None if labels is None else labels.reshape(-1),
            loss_mask=None if loss_mask is None else loss_mask.reshape(-1),
            head_rows=None if meta is None else meta.head_rows(labels, loss_mask),
        )

    def _blank_image_features(self, device, host_meta: bool = False) -> torch.Tensor:
        """Connector output for one blank merge block (the smallest image the encoder takes).

        `host_meta`: use the blank image's metadata made once and kept on `device` (no host
        read, no copy after the first call), as for packs that come with metadata."""
        m, p = self.cfg.connector.merge_size, self.cfg.vision.patch_size
        pixels = torch.zeros(
            m * m,
            self.cfg.vision.num_channels * p * p,
            device=device,
            dtype=self.config.params_dtype,
        )
        if not host_meta:
            grid = torch.tensor([[1, m, m]], device=device)
            return self.connector(self.vision_model(pixels, grid))
        key = str(device)
        if key not in self._blank_meta:
            grids = ((1, m, m),)
            self._blank_meta[key] = (
                torch.tensor(grids, device=device),
                VisionMeta.build(self.cfg, grids).to(device),
            )
        grid, vision_meta = self._blank_meta[key]
        return self.connector(self.vision_model(pixels, grid, vision_meta))


def build_model(
    cfg: NaViLModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    pg_collection: Optional[ProcessGroupCollection] = None,
    **model_kwargs,
) -> list[NaViLModel]:
    """This rank's model chunks (one per virtual pipeline stage), like Megatron-LM's get_model.
    One process-group collection serves every chunk (`pg_collection`, default: Megatron's
    global groups). `model_kwargs` go to every NaViLModel (experts_trainable,
    vision_every_micro_batch)."""
    from megatron.core.pipeline_parallel.utils import is_vp_first_stage, is_vp_last_stage

    if pg_collection is None:
        pg_collection = default_process_groups()
    vp = parallel.virtual_pipeline_model_parallel_size
    pp_rank, pp_size = get_pg_rank(pg_collection.pp), get_pg_size(pg_collection.pp)
    chunks = []
    for stage in range(vp or 1):
        vp_stage = stage if vp is not None else None
        first = pp_rank == 0 and (vp is None or is_vp_first_stage(vp_stage, vp))
        last = pp_rank == pp_size - 1 and (vp is None or is_vp_last_stage(vp_stage, vp))
        chunks.append(
            NaViLModel(
                cfg,
                parallel,
                precision,
                pre_process=first,
                post_process=last,
                vp_stage=vp_stage,
                pg_collection=pg_collection,
                **model_kwargs,
            )
        )
    return chunks
