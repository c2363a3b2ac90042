"""Public entry point of the data path: the training and validation loaders.

    from megatron_navil.data.loader import build_train_loader, build_valid_loader

    loader = build_train_loader(data_cfg, model_cfg, tokenizer, dp_rank, dp_size,
                                micro_batches_per_step, seq_length=T, seed=S)
    batch = next(loader)        # NaViLBatch (megatron_navil/batch.py), one packed sequence of
                                # exactly T tokens; infinite over epochs
    state = loader.state_dict() # plain dict (ints/strings): save it with the checkpoint
    loader.load_state_dict(state)  # next(loader) = the batch an uninterrupted run would give
    loader.counters             # rank-local totals: batches, samples, tokens, loss_tokens,
                                # padding_tokens, images, skipped_images, corrupt_samples,
                                # truncated_samples, skipped_samples
    loader.close()

    valid = build_valid_loader(data_cfg, model_cfg, tokenizer, dp_rank, dp_size,
                               seq_length=T, seed=S)
    for batch in itertools.islice(valid, eval_iters): ...   # every iter() restarts: the same
                                                           # batches each evaluation
Tensors are on the CPU (pixel_values float32, or bfloat16 with data.pixel_dtype), except with
decode_device gpu (or auto on a CUDA machine), where pixel_values are made and kept on the
current CUDA device (build the loader after torch.cuda.set_device). They are built on the
loader's own CUDA stream, and `next()` makes the caller's current stream wait for them: use them
on the stream that was current at `next()` (or synchronise it first). The CPU tensors are then
pinned, so `batch.to(device, non_blocking=True)` is asynchronous; with CPU decode they are pinned
too on a CUDA machine when data.host_pack_metadata is on (the default), which also attaches
`batch.pack_meta` (megatron_navil/pack_meta.py). Every DP rank yields the same
number of micro-batches per epoch (a multiple of micro_batches_per_step), so expert-parallel
collectives never wait on a rank that ran dry. Ranks of one DP group (TP/PP/EP peers) build
identical loaders and get identical batches.

The sequence length and seed are arguments, not DataConfig fields: a job has one home for each
(`training.seq_length`, `training.seed`); the image patch limits come from the model config.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from megatron_navil.config.base import ConfigError
from megatron_navil.config.data import DataConfig
from megatron_navil.config.model import SPECIAL_TOKENS, NaViLModelConfig
from megatron_navil.data.builder import Datasets, PackBuilder
from megatron_navil.data.costs import CostModel
from megatron_navil.data.cuda_handoff import CudaHandoff
from megatron_navil.data.dealing import PackCost
from megatron_navil.data.decode import DaliImageDecoder, cuda_available
from megatron_navil.data.image_header import image_pixel_limit
from megatron_navil.data.index import DataError, blended_fingerprint, load_dataset
from megatron_navil.data.iterator import NaViLDataLoader, Schedule
from megatron_navil.data.planner import PlanParams
from megatron_navil.data.sizing import ImageSizer
from megatron_navil.utils.dtypes import torch_dtype
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)

__all__ = ["build_train_loader", "build_valid_loader", "NaViLDataLoader", "DataConfig"]


def build_train_loader(
    data_cfg: DataConfig,
    model_cfg: NaViLModelConfig,
    tokenizer,
    dp_rank: int = 0,
    dp_size: int = 1,
    micro_batches_per_step: int = 1,
    *,
    seq_length: int,
    seed: int,
    pack_cost: Optional[PackCost] = None,
) -> NaViLDataLoader:
    """Shuffled, blended, infinite training loader for this data-parallel rank: packs of exactly
    `seq_length` tokens, epoch orders and blend draws from `seed`. `pack_cost` (the trainer
    passes a planned pack's model FLOPs) balances each step's packs over the DP ranks when
    data_cfg.balance_dp_ranks is set (data/dealing.py); without it packs are dealt round-robin."""
    if not data_cfg.train_paths:
        raise ConfigError(
            "data.train_paths is empty: give the navil-preprocess output directories to train on"
        )
    return _build(
        data_cfg,
        model_cfg,
        tokenizer,
        data_cfg.train_paths,
        data_cfg.train_weights,
        data_cfg.samples_per_epoch,
        data_cfg.shuffle,
        dp_rank,
        dp_size,
        micro_batches_per_step,
        seq_length,
        seed,
        restart_on_iter=False,
        pack_cost=pack_cost if data_cfg.balance_dp_ranks else None,
    )


def build_valid_loader(
    data_cfg: DataConfig,
    model_cfg: NaViLModelConfig,
    tokenizer,
    dp_rank: int = 0,
    dp_size: int = 1,
    *,
    seq_length: int,
    seed: int,
) -> NaViLDataLoader:
    """Held-out loader in file order (no shuffle, no blend weights); every `iter()` restarts
    it from the first batch, and it cycles, so an evaluation of n micro-batches always sees the
    same n batches. `seed` (the job's) enters only the state fingerprint: nothing is drawn."""
    if not data_cfg.valid_paths:
        raise ConfigError("data.valid_paths is empty: give held-out navil-preprocess outputs")
    return _build(
        data_cfg,
        model_cfg,
        tokenizer,
        data_cfg.valid_paths,
        (),
        None,
        False,
        dp_rank,
        dp_size,
        1,
        seq_length,
        seed,
        restart_on_iter=True,
    )


def check_tokenizer(tokenizer, cfg: NaViLModelConfig) -> None:
    """The tokenizer's special-token ids must be the model's (image tokens are routed by id)."""
    bad = [
        (t, tokenizer.special_token_id(t), cfg.special_token_id(t))
        for t in SPECIAL_TOKENS
        if tokenizer.special_token_id(t) != cfg.special_token_id(t)
    ]
    if bad:
        t, got, want = bad[0]
        raise ConfigError(
            f"tokenizer gives {t} id {got}, the model config {want} "
            f"(llm.first_special_token_id = {cfg.llm.first_special_token_id}); "
            "use the tokenizer the model was configured for"
        )
    if tokenizer.vocab_size > cfg.llm.vocab_size:
        raise ConfigError(
            f"tokenizer vocab {tokenizer.vocab_size} > llm.vocab_size {cfg.llm.vocab_size}"
        )


def resolve_decode_device(setting: str) -> str:
    if setting == "auto":
        return "gpu" if cuda_available() else "cpu"
    return setting


def _build(
    data_cfg: DataConfig,
    model_cfg: NaViLModelConfig,
    tokenizer,
    paths: Sequence[str],
    weights: Sequence[float],
    samples_per_epoch: Optional[int],
    shuffle: bool,
    dp_rank: int,
    dp_size: int,
    micro_batches_per_step: int,
    seq_length: int,
    seed: int,
    restart_on_iter: bool,
    pack_cost: Optional[PackCost] = None,
) -> NaViLDataLoader:
    data_cfg.validate()
    cfg = model_cfg  # its min/max_dynamic_patch size the images
    cfg.validate()
    if seq_length < 1:
        raise ConfigError(f"seq_length must be >= 1, got {seq_length}")
    if seq_length > cfg.llm.max_sequence_length:
        raise ConfigError(
            f"seq_length {seq_length} > llm.max_sequence_length {cfg.llm.max_sequence_length}"
        )
    if micro_batches_per_step < 1 or dp_size < 1:
        raise ValueError("dp_size and micro_batches_per_step must be >= 1")
    check_tokenizer(tokenizer, cfg)
    style, add_bos = data_cfg.resolved_chat_style(cfg), data_cfg.resolved_add_bos(cfg)
    # O(1) per dataset with a binary index: nothing per sample is read or kept here; costs and
    # refusals are computed per planner window (costs.py)
    datasets = [load_dataset(p, tokenizer, style, data_cfg.recount_tokens) for p in paths]
    max_pixels = image_pixel_limit(cfg, data_cfg.max_image_pixels)
    sizer = ImageSizer(cfg, data_cfg.multiscale)
    costs = CostModel(
        datasets,
        sizer,
        add_bos,
        max_pixels,
        data_cfg.max_images_per_pack,
        tokenizer,
        style,
    )
    params = PlanParams(
        seq_length,
        data_cfg.max_images_per_pack,
        data_cfg.pack_window,
        data_cfg.plan_chunk_samples,
        data_cfg.overlong_policy,
    )
    device = resolve_decode_device(data_cfg.decode_device)
    decoder = DaliImageDecoder(
        max_batch=data_cfg.max_images_per_pack,
        num_scales=1,  # grows with the first multi-scale image that needs more
        num_threads=data_cfg.num_decode_threads,
        device=device,
        patch_size=cfg.vision.patch_size,
        merge_size=cfg.connector.merge_size,
        max_pixels=max_pixels,
    )
    data = Datasets(datasets)
    builder = PackBuilder(
        data,
        costs,
        sizer,
        decoder,
        cfg,
        tokenizer,
        style,
        add_bos,
        seq_length,
        torch_dtype(data_cfg.pixel_dtype),
        pack_metadata=data_cfg.host_pack_metadata,
    )
    schedule = Schedule(
        tuple(len(d) for d in datasets),
        tuple(weights),
        samples_per_epoch,
        seed,
        shuffle,
        dp_rank,
        dp_size,
        micro_batches_per_step,
        data_cfg.shuffle_block_samples,
        pack_cost,
        data_cfg.balance_window_steps if pack_cost is not None else 1,
    )
    if (
        pack_cost is not None
        and dp_size > 1
        and micro_batches_per_step <= 2
        and data_cfg.balance_window_steps == 1
        and not restart_on_iter
    ):
        log.info(
            "balanced dealing with %d micro-batch(es) per rank per step can hardly even out the "
            "ranks' vision work; data.balance_window_steps 16-64 moves packs between steps so "
            "that each step's packs cost alike (docs/data_loader.md, Dealing)",
            micro_batches_per_step,
        )
    fingerprint = blended_fingerprint(
        datasets,
        dict(
            weights=list(weights),
            samples_per_epoch=samples_per_epoch,
            shuffle=shuffle,
            seed=seed,
            plan=list(dataclasses.astuple(params)),
            # the windowed epoch order (order.py) replaced whole-epoch numpy permutations:
            # states saved under the old order are refused, not silently resumed elsewhere
            order="feistel-blocks-1",
            shuffle_block=data_cfg.shuffle_block_samples,
            multiscale=data_cfg.multiscale,
            min_patch=cfg.min_dynamic_patch,
            max_patch=cfg.max_dynamic_patch,
            style=style,
            add_bos=add_bos,
            # the default limit follows max_patch (above); only an explicit one is new here,
            # so states saved before the setting existed still restore
            **({"max_pixels": max_pixels} if data_cfg.max_image_pixels is not None else {}),
        ),
    )
    log.info(
        "data: %d dataset(s), %d samples, %d images, seq_length %d, decode on %s, rank %d/%d",
        len(datasets),
        len(costs),
        sum(ds.num_images for ds in datasets),
        seq_length,
        device,
        dp_rank,
        dp_size,
    )
    # GPU decode: batches are built on a private stream of the decoder's device and handed to
    # the trainer's stream by event (device_id None on the CPU path: no stream, no event)
    return NaViLDataLoader(
        builder,
        costs,
        params,
        schedule,
        data_cfg.prefetch_depth,
        fingerprint,
        restart_on_iter=restart_on_iter,
        handoff=CudaHandoff(decoder.device_id, pin_device=_pin_device(data_cfg, device)),
    )


def _pin_device(data_cfg: DataConfig, decode_device: str) -> Optional[int]:
    """The CUDA device to pin CPU-decoded batches for (the trainer's current one), or None.

    GPU decode pins in any case (cuda_handoff.py); with CPU decode on a CUDA machine, pinning is
    part of data.host_pack_metadata: the batch and its metadata then reach the GPU by
    asynchronous copies instead of staged pageable ones."""
    if decode_device == "gpu" or not data_cfg.host_pack_metadata or not cuda_available():
        return None
    import torch

    return torch.cuda.current_device()


__all__ += ["check_tokenizer", "resolve_decode_device", "DataError"]
