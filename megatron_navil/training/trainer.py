"""The training loop: Megatron-Core schedules, DDP, (distributed) optimizer, checkpoints, metrics.

set-up:  process groups -> model chunks (this rank's pipeline stage) -> stage freezing
         -> Megatron DDP -> optimizer + LR schedule -> data loaders -> resume (if any)
step:    num_microbatches packs -> get_forward_backward_func (1F1B / interleaved / none)
         -> DDP grad reduce + finalize (per-token loss normalisation over DP)
         -> grad norm (+clip) -> skip the update if loss or norm is not finite
         -> optimizer step -> LR step -> metrics -> eval / checkpoint / pre-emption
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_navil import checkpoint as ckpt
from megatron_navil.batch import NaViLBatch
from megatron_navil.config.base import ConfigError
from megatron_navil.config.pretrain import PretrainConfig
from megatron_navil.data.tokenizer import configured_vocabulary
from megatron_navil.errors import JobError, UserError
from megatron_navil.models.backends import resolve_backend
from megatron_navil.models.navil import build_model
from megatron_navil.training.data import build_loaders, concat_packs
from megatron_navil.training.flops import (
    CONVENTION,
    micro_batch_count,
    peak_tflops,
    trained_parts,
)
from megatron_navil.training.metrics import MetricsWriter, dp_imbalance, memory_gb, reduce_step_sums
from megatron_navil.training.optimizer import (
    build_optimizer,
    build_scheduler,
    guarded_step,
    prime_optimizer_state,
)
from megatron_navil.training.optimizer_state import master_copy_is_model_weight
from megatron_navil.training.signals import ExitSignalHandler
from megatron_navil.training.stages import apply_stage, experts_trainable
from megatron_navil.training.state import (
    capture_optimizer_template,
    loaded_data_state,
    restore,
    train_sharded_state,
)
from megatron_navil.training.step import (
    ddp_precision,
    forward_backward,
    padding_trim_multiple,
    params_gathered,
    wrap_ddp,
)
from megatron_navil.utils.distributed import any_rank, initialize_model_parallel, lost_peer
from megatron_navil.utils.dtypes import torch_dtype
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


class TrainingStopped(UserError, RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row); the message says why
    and what to change (exit status 2: rerunning the same command would stop the same way)."""


class Trainer:
    """One navil-pretrain job: builds the parallel state, the model (Megatron-Core DDP chunks),
    the optimizer and scheduler, the loader and the checkpointing from a PretrainConfig, then runs
    the training loop with evaluation, metrics, periodic and signal-triggered saves."""

    def __init__(self, cfg: PretrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.model_cfg = cfg.resolved_model(configured_vocabulary(cfg.tokenizer))
        initialize_model_parallel(cfg.parallel, seed=cfg.training.seed)
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.num_microbatches = cfg.training.num_microbatches(self.dp_size)

        # Stage-dependent model choices: TE's grouped expert GEMM cannot train one expert and
        # freeze the other; DDP's overlapped grad reduce needs every trainable parameter to get a
        # gradient on every micro-batch, so text-only packs then run the encoder on a blank image.
        vision_trains = cfg.stage.trains("vision") or cfg.stage.trains("connector")
        chunks = build_model(
            self.model_cfg,
            cfg.parallel,
            ddp_precision(cfg.precision, resolve_backend(cfg.precision)),
            experts_trainable=experts_trainable(cfg.stage),
            vision_every_micro_batch=cfg.optimizer.overlap_grad_reduce and vision_trains,
        )
        if torch.cuda.is_available():
            chunks = [c.cuda() for c in chunks]
        trainable = apply_stage(chunks, cfg.stage)
        log.info("trainable parameters on this rank by part: %s", dict(trainable))
        self.chunks = wrap_ddp(
            chunks,
            overlap_grad_reduce=cfg.optimizer.overlap_grad_reduce,
            overlap_param_gather=cfg.optimizer.overlap_param_gather,
            use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
            bucket_size=cfg.optimizer.bucket_size,
        )
        self.trim_multiple = padding_trim_multiple(cfg.training, cfg.parallel, cfg.precision)
        if cfg.training.trim_padding and self.trim_multiple is None:
            log.info(
                "training.trim_padding does not apply with pipeline size %d: pipeline stages "
                "exchange activations of the full --seq-length",
                cfg.parallel.pipeline_model_parallel_size,
            )
        self.optimizer = build_optimizer(self.chunks, cfg.optimizer, cfg.stage, cfg.precision)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, cfg.training)
        self.train_loader, self.valid_batches = build_loaders(
            cfg,
            self.model_cfg,
            self.dp_rank,
            self.dp_size,
            packs_per_step=self.num_microbatches * cfg.training.micro_batch_size,
        )
        self.step = 0
        self.counters = {"consumed_samples": 0, "consumed_tokens": 0, "skipped_steps": 0}
        self.async_queue = None
        if cfg.checkpoint.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        self._maybe_resume()
        # MFU convention (training/flops.py): model FLOPs of the parts this stage trains, padding
        # out; against the dense bf16 peak, and FP8 runs also against the dense FP8 peak.
        self.trained = trained_parts(cfg.stage)
        self.peak = peak_tflops(cfg.logging.peak_tflops)
        self.fp8_peak = (
            peak_tflops(cfg.logging.fp8_peak_tflops, fp8=True) if cfg.precision.fp8 else None
        )
        log.info("%s; trained parts %s", CONVENTION, sorted(self.trained))

    # ------------------------------------------------------------------ checkpoints
    def _resume_path(self) -> Optional[str]:
        c = self.cfg.checkpoint
        if c.load and (Path(c.load) / ckpt.METADATA).exists():
            return c.load  # an explicit iteration directory (e.g. one before a damaged latest)
        if c.save and ckpt.read_latest(c.save) is not None:
            return c.save  # re-running the same command resumes the run
        if c.load and c.save and Path(c.load).resolve() == Path(c.save).resolve():
            # `--load` = `--save` (Megatron-LM's requeue idiom) before any save completed, e.g.
            # the job was killed during its first save: there is nothing to resume yet.
            log.warning(
                "no complete checkpoint in %s yet (was the first save interrupted?): starting "
                "from step 0",
                c.save,
            )
            return None
        return c.load

    def _maybe_resume(self) -> None:
        path = self._resume_path()
        if path is None:
            return
        c = self.cfg.checkpoint
        finetune = c.finetune and path == c.load
        meta = ckpt.read_metadata(path)
        if not finetune:
            self._check_tokenizer(path, meta)
            self._log_config_changes(path, meta)
            prime_optimizer_state(self.optimizer)
        same_layout = meta.get("world_size") == torch.distributed.get_world_size()
        # --finetune takes the model weights only: fresh optimizer, scheduler, step and data.
        opt, sched = (None, None) if finetune else (self.optimizer, self.scheduler)
        request = train_sharded_state(
            self.chunks,
            opt,
            sched,
            is_loading=True,
            train=None if finetune else {},
            data=None if finetune else {},
            include_rng=same_layout and not finetune,
        )
        template = capture_optimizer_template(request)
        optional = master_copy_is_model_weight(torch_dtype(self.cfg.precision.params_dtype))
        loaded, meta = ckpt.load(
            path, request, self.model_cfg, optional=optional, verify=c.verify_load
        )
        restore(loaded, self.chunks, opt, sched, template)
        if finetune:
            log.info("loaded model weights from %s (step %d) for fine-tuning", path, meta["step"])
            return
        self.step = int(loaded["train"]["step"])
        self.counters.update({k: v for k, v in loaded["train"].items() if k != "step"})
        self.train_loader.load_state_dict(loaded_data_state(loaded))
        log.info(
            "resumed from %s at step %d%s",
            path,
            self.step,
            "" if same_layout else " (new parallel layout: RNG re-seeded)",
        )

    def _log_config_changes(self, path: str, meta: dict) -> None:
        """Say which settings differ from the run being resumed (its saved run config, read in
        the current or the older form); a config that cannot be read is only a warning: the
        model config that decides whether the checkpoint fits is checked on load."""
        saved = meta.get("config")
        if not isinstance(saved, dict):
            return
        try:
            changes = self.cfg.changes_from(PretrainConfig.from_saved(saved))
        except ConfigError as e:
            log.warning("cannot read the run config saved with %s: %s", path, e)
            return
        if changes:
            log.info("resuming %s with changed settings: %s", path, "; ".join(changes))

    def _check_tokenizer(self, path: str, meta: dict) -> None:
        """A resumed run must tokenize as the run it continues (the checkpoint's digest)."""
        saved = meta.get("tokenizer_sha256")
        if saved is None or self.cfg.tokenizer is None:
            return
        now = ckpt.tokenizer_digest(self.cfg.tokenizer)
        if now != saved:
            raise ckpt.CheckpointError(
                f"{path} was trained with another tokenizer than --tokenizer-model "
                f"{self.cfg.tokenizer} (sha256 {saved[:12]} vs {now[:12]}; the checkpoint's copy "
                f"is in {ckpt.resolve(path) / ckpt.TOKENIZER_DIR}): resume with that tokenizer, or "
                "start a new stage from it with --finetune"
            )

    def save(self, data_state: Optional[dict] = None) -> None:
        """Checkpoint the run at `self.step`. `data_state`: the loader's state to record when
        it has moved past the step boundary (default: its current state)."""
        c = self.cfg.checkpoint
        if not c.save:
            return
        state = train_sharded_state(
            self.chunks,
            self.optimizer,
            self.scheduler,
            train={"step": self.step, **self.counters},
            data=self.train_loader.state_dict() if data_state is None else data_state,
        )
        meta = {
            "world_size": torch.distributed.get_world_size(),
            "parallel": self.cfg.parallel.to_dict(),
            "config": self.cfg.to_dict(),
        }

        def on_complete(path):
            if c.save_hf:
                self._export_hf(path)
            ckpt.prune(c.save, c.keep_last)

        with params_gathered(self.chunks):  # the step's update on every rank before saving
            ckpt.save(
                c.save,
                self.step,
                state,
                self.model_cfg,
                meta,
                self.async_queue,
                on_complete,
                tokenizer=self.cfg.tokenizer,
            )

    def _export_hf(self, path: Path) -> None:
        """Rank 0, once the checkpoint is complete: write its HF copy to `<save>/hf_<iter dir>`
        (read back from the files just written, so the copy is exactly the checkpoint)."""
        from megatron_navil.conversion import ConversionError, export_hf

        out = ckpt.hf_export_dir(path)
        try:  # the tokenizer comes from the checkpoint itself (iter_*/tokenizer)
            report = export_hf(path, out, self.model_cfg, overwrite=True)
        except (ConversionError, ckpt.CheckpointError) as e:  # the checkpoint is saved: go on
            log.error("HF export of %s failed: %s", path, e)
            return
        log.info(
            "wrote HF copy %s (%.1f s)%s",
            out,
            report.seconds,
            ""
            if not report.problems
            else f"; the released code would reject it ({len(report.problems)} problem(s) above)",
        )

    # ------------------------------------------------------------------ steps
    def _next_batches(self) -> list[NaViLBatch]:
        """This step's micro-batches. Data that cannot be read on any rank (a path that
        disappeared, an I/O error; damaged bytes are skipped by the loader instead) stops the
        run on every rank together: a checkpoint of the state before this step, then one error
        line. Costs one all-reduce of one integer per step."""
        mbs = self.cfg.training.micro_batch_size
        before, failure = self.train_loader.state_dict(), None
        try:
            packs = [next(self.train_loader) for _ in range(self.num_microbatches * mbs)]
        except OSError as e:
            failure = e
        if any_rank(failure is not None):
            self.save(data_state=before)
            saved = "no --save: nothing saved"
            if self.cfg.checkpoint.save:
                saved = f"saved step {self.step}"
            why = (
                f"{failure.strerror or failure} ({failure.filename})"
                if isinstance(failure, OSError) and failure.filename
                else str(failure or "another rank could not read its data")
            )
            raise JobError(
                f"cannot read the training data at step {self.step + 1}: {why[:300]}; {saved}; "
                "make the data readable again and re-run the same command to resume"
            )
        return [concat_packs(packs[i : i + mbs], self.model_cfg) for i in range(0, len(packs), mbs)]

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        self.optimizer.zero_grad()  # forward_backward zeroes the DDP grad buffers
        batches = self._next_batches()
        seq = self.cfg.training.seq_length * self.cfg.training.micro_batch_size
        reports = forward_backward(self.chunks, batches, seq, trim_multiple=self.trim_multiple)
        flops = sum(micro_batch_count(self.model_cfg, b, self.trained).total for b in batches)
        padded = sum(
            micro_batch_count(self.model_cfg, b, self.trained, include_padding=True).total
            for b in batches
        )
        samples = sum(int(b.metadata.get("samples", 0)) for b in batches)
        tokens = sum(b.num_tokens for b in batches)
        skipped = int(self.train_loader.counters.get("skipped_images", 0))
        sums = reduce_step_sums(reports, [flops, padded, samples, tokens, skipped])
        loss_sum, counted, flops_all, padded_all, samples_all, tokens_all, skipped_all = sums
        loss = loss_sum / max(counted, 1.0)
        imbalance = dp_imbalance(flops, flops_all, self.dp_size)

        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step's update uses
        ok, grad_norm = guarded_step(self.optimizer, math.isfinite(loss))
        if ok:
            self.scheduler.step(increment=1)
            self.counters["skipped_in_a_row"] = 0
        else:
            self.counters["skipped_steps"] += 1
            self.counters["skipped_in_a_row"] = self.counters.get("skipped_in_a_row", 0) + 1
            log.warning(
                "step %d: non-finite loss %s or grad norm %s: update skipped",
                self.step + 1,
                loss,
                grad_norm,
            )
        self.step += 1
        self.counters["consumed_samples"] += int(samples_all)
        self.counters["consumed_tokens"] += int(tokens_all)
        dt = time.perf_counter() - t0
        world = torch.distributed.get_world_size()
        tflops = flops_all / dt / world / 1e12
        return {
            "step": self.step,
            "loss": loss if math.isfinite(loss) else None,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "lr": lr,
            "tokens_per_s": tokens_all / dt,
            "samples_per_s": samples_all / dt,
            "tflops_per_gpu": tflops,
            "padded_tflops_per_gpu": padded_all / dt / world / 1e12,
            "mfu": tflops / self.peak if self.peak else None,
            "mfu_fp8": tflops / self.fp8_peak if self.fp8_peak else None,
            "dp_imbalance": imbalance,
            "step_time_s": dt,
            "num_tokens": int(tokens_all),
            "num_samples": int(samples_all),
            "skipped_images": int(skipped_all),
            "skipped_steps": self.counters["skipped_steps"],
            "mem_gb": memory_gb(),
        }

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.valid_batches is None:
            return None
        for c in self.chunks:
            c.eval()
        batches = list(itertools.islice(self.valid_batches(), self.cfg.training.eval_iters))
        with params_gathered(self.chunks):
            reports = forward_backward(
                self.chunks,
                batches,
                self.cfg.training.seq_length,
                forward_only=True,
                trim_multiple=self.trim_multiple,
            )
        for c in self.chunks:
            c.train()
        loss_sum, counted = reduce_step_sums(reports, [])
        return loss_sum / max(counted, 1.0)

    # ------------------------------------------------------------------ the run
    def train(self) -> int:
        t, c = self.cfg.training, self.cfg.checkpoint
        writer = MetricsWriter(self.cfg.logging, t.train_iters, self.step)
        signals = ExitSignalHandler().install() if c.exit_on_signal else None
        peers_lost = False
        for chunk in self.chunks:
            chunk.train()
        try:
            while self.step < t.train_iters:
                record = self.train_step()
                if t.eval_interval and self.step % t.eval_interval == 0:
                    record["valid_loss"] = self.evaluate()
                writer.write(record)
                if self.counters["skipped_in_a_row"] >= t.max_skipped_steps_in_a_row:
                    raise TrainingStopped(
                        f"{self.counters['skipped_in_a_row']} steps in a row had a non-finite loss "
                        f"or gradient norm (last at step {self.step}); lower --lr, check the data, "
                        "or resume from the last checkpoint"
                    )
                if self.async_queue is not None:
                    self.async_queue.maybe_finalize_async_calls(blocking=False)
                if signals is not None and signals.should_exit():
                    self.save()
                    log.info(
                        "stopping at step %d on signal; re-run the same command to resume",
                        self.step,
                    )
                    return 0
                if (
                    c.save_interval
                    and self.step % c.save_interval == 0
                    and self.step < t.train_iters
                ):
                    self.save()
            self.save()
            return 0
        except RuntimeError as e:
            reason = lost_peer(e)
            if reason is None:
                raise
            peers_lost = True  # no more collectives: they would fail or hang
            raise JobError(
                f"stopped at step {self.step}: a process of this job died or became unreachable "
                f"({reason}); re-run the same command to resume from the last complete checkpoint"
            ) from e
        finally:
            if self.async_queue is not None and not peers_lost:
                self.async_queue.maybe_finalize_async_calls(blocking=True)
                self.async_queue.close()
            if signals is not None:
                signals.restore()
            writer.close()
            self.train_loader.close()
