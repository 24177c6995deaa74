"""The training loop: micro-batches -> loss -> clipped AdamW step, with eval, logs and checkpoints.

    config -> processes and mesh -> model (built, parallelized, initialised) -> optimizer
           -> resume -> data -> loop { step; log; evaluate; save; stop? }

The loss of a step is the token-level cross-entropy summed over the loss mask and divided by the
number of loss tokens in the whole global batch, so it is the same number however the batch is
split into micro-batches, data-parallel ranks, context-parallel pieces of sequences, tensor-parallel
slices of the vocabulary or pipeline stages (`ember.parallel.mesh` describes the layouts). A step performs no host sync of its own: losses,
gradient norms and skip flags stay on the device until the log interval reads them (besides, the
loop reads the NaN-streak counter every `min(log interval, max skips)` iterations, and ranks vote
on SIGTERM through a small CPU collective after each iteration).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ember.checkpoint import foreign
from ember.checkpoint import training as ckpt
from ember.checkpoint.initialize import converted_weight_chunks, initialize
from ember.config import Config, Layout, validate
from ember.config.run_identity import run_differences
from ember.data.documents import finetune_pack, packed_document_kwargs
from ember.errors import EmberError
from ember.models.from_config import TRAINING_SETTINGS
from ember.models.initialization import initial_weight_chunks
from ember.parallel.fsdp import prepare_backward
from ember.parallel.mesh import build_meshes, default_backend, default_device
from ember.train import gradients
from ember.train import model_setup
from ember.train.cpu_threads import set_cpu_threads
from ember.train.fused_loss import lm_loss_sum
from ember.progress import Progress
from ember.train.metrics import MetricsLogger, format_train_line, memory_record, peak_tflops
from ember.train.optim import build_optimizer, set_lr
from ember.train.precision import LossScaler, autocast
from ember.train.profiling import RunProfiler
from ember.train.schedule import build_schedule
from ember.train.trackers import build_trackers


@dataclass
class TrainState:
    """Counters that, with the model, optimizer, RNG and loss scale, define where a run is."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_iterations: int = 0
    # validation samples evaluated so far: each evaluation takes the next ones, as in Megatron
    consumed_valid_samples: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "consumed_tokens": self.consumed_tokens, "skipped_iterations": self.skipped_iterations,
                "consumed_valid_samples": self.consumed_valid_samples}

    @classmethod
    def from_saved(cls, saved: dict, eval_interval: int, eval_iters: int, global_batch_size: int) -> TrainState:
        state = cls(**{k: saved[k] for k in cls().to_dict() if k in saved})
        if "consumed_valid_samples" not in saved:  # saved before ember counted them: Megatron's estimate
            state.consumed_valid_samples = (state.iteration // eval_interval) * eval_iters * global_batch_size
        return state


@dataclass
class TrainResult:
    iteration: int
    reason: str  # "finished", "exit_interval", "sigterm"
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> loss, as logged


def environment() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; one process otherwise."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One training run on this process (one rank under torchrun): `setup()`, `train()`, `close()`.

    `stream` receives rank 0's console lines (stdout by default).
    """

    def __init__(self, config: Config, stream=None):
        self.rank, self.local_rank, self.world_size = environment()
        # Every check that can fail does so here, before any process group exists.
        self.config = validate(config, self.world_size)
        self.layout = Layout.from_config(self.config.parallel, self.config.train, self.world_size)
        self.device = default_device()
        self.meshes = None
        self.pipeline = None  # the pipeline schedule, with pipeline parallelism
        self._owns_process_group = False
        self.stream = stream
        self.state = TrainState()
        self.checkpointer: ckpt.Checkpointer | None = None
        self._loader_state: dict | None = None  # the data position of a resumed run

    # ------------------------------------------------------------------ setup

    def setup(self) -> Trainer:
        c = self.config
        self.cpu_threads = set_cpu_threads(c.train.cpu_threads) if self.device.type == "cpu" else None
        self.metrics = MetricsLogger(c.output_dir, enabled=self.rank == 0, tensorboard=c.logging.tensorboard,
                                     tensorboard_dir=c.logging.tensorboard_dir, stream=self.stream,
                                     trackers=build_trackers(c) if self.rank == 0 else [],
                                     log_format=c.logging.log_format, ranks=(self.rank, self.world_size))
        ref, self.resuming_own_run = self._checkpoint_to_start_from()
        self.model_args = model_setup.resolve_model_args(c, ref)
        if ref is not None and ref.kind == "training" and c.model.name:
            _check_same_architecture(self.model_args, ref.model_args(), ref)
        # the model against the layout (heads, layers, experts, sequence): still no process group
        self.layout.check_model(self.model_args, c.data.seq_length)
        self._init_distributed()
        seed_everything(self._stage_seed(c.train.seed))
        if self.meshes is not None:
            dp, loss = self.meshes.dp, self.meshes.loss
            self.dp_rank, self.dp_size = dp.get_local_rank(), dp.size()
            # losses and loss-token counts are summed over data- and context-parallel ranks
            self.loss_group = loss.get_group() if loss.size() > 1 else None
        else:
            self.dp_rank, self.dp_size, self.loss_group = 0, 1, None
        built = model_setup.build_model(self.model_args, c, self.device, self.meshes)
        self.model, self.modules, self.parts, self.expert_params = (
            built.model, built.modules, built.pipeline, built.expert_params)
        self.optimizer = build_optimizer(self.model, c.optim, c.train.lr, self.device)
        if self.meshes is not None and self.meshes.ep is not None:  # experts live on their own mesh
            gradients.split_param_groups_by_mesh(self.optimizer)
        self.scaler = LossScaler.for_precision(
            c.train.precision, self.device, loss_scale=c.train.loss_scale,
            initial_scale=c.train.initial_loss_scale, min_scale=c.train.min_loss_scale,
            window=c.train.loss_scale_window, hysteresis=c.train.hysteresis)
        self._load_or_initialize(ref)
        if c.checkpoint.overwrite and c.checkpoint.save:
            self._remove_previous_run()
        if self.parts is not None:
            from ember.parallel.pipeline import build_schedule as build_pipeline_schedule

            self.pipeline = build_pipeline_schedule(self.parts, self.layout.schedule, self.layout.micro_batches)
        self._build_data()
        self.schedule = build_schedule(c, self.train_iters)
        if c.checkpoint.save:
            self.checkpointer = ckpt.Checkpointer(c.checkpoint.save, c.checkpoint.keep_last, c.checkpoint.async_save)
        self.stop_signal = ckpt.StopSignal(c.checkpoint.exit_on_sigterm)
        self.peak = peak_tflops(self.device, c.train.precision, c.logging.peak_tflops)
        # --profile / --record-memory-history (ember.train.profiling): a no-op unless asked
        self.profiler = RunProfiler(c, self.rank, self.device, self.train_iters, notice=self.metrics.print)
        self.flops_per_token = self.model_args.flops_per_token(c.data.seq_length)
        return self

    def _checkpoint_to_start_from(self) -> tuple[ckpt.CheckpointRef | None, bool]:
        return checkpoint_to_start_from(self.config, self.metrics.print)

    def _remove_previous_run(self) -> None:
        """--overwrite: the checkpoints of the run that --save held go, once every rank has read
        what it loads (--load may be that same folder), before this run saves its own."""
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            removed = foreign.remove_training_checkpoints(self.config.checkpoint.save)
            if removed:
                self.metrics.print(f"--overwrite: removed {', '.join(removed)} of the previous run in "
                                   f"{self.config.checkpoint.save}")
        if dist.is_initialized():
            dist.barrier()

    def _init_distributed(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size == 1:
            return
        if not dist.is_initialized():
            backend = self.config.parallel.backend or default_backend(self.device)
            if backend != "gloo" and ":" not in backend:
                # CPU collectives too: async checkpoint saves and the stop-signal vote use them.
                backend = f"cpu:gloo,{self.device.type}:{backend}"
            dist.init_process_group(backend=backend)
            self._owns_process_group = True
        self.meshes = build_meshes(self.layout, self.device.type)

    def _load_or_initialize(self, ref: ckpt.CheckpointRef | None) -> None:
        c = self.config
        if ref is not None and ref.kind == "training":
            # files checked against their checksums; a damaged `latest` gives way to the previous one
            ref = ckpt.usable_checkpoint(ref, self.metrics.print)
        model_setup.check_lora_checkpoint(c, ref)
        if model_setup.lora_spec(c) is not None and not model_setup.holds_adapters(ref):
            # LoRA (issue 17): base weights from wherever --load points, plus new or --lora-load adapters;
            # a checkpoint of a LoRA run resumes below like any other
            model_setup.initialize_lora(self.model, ref, c, self.model_args, self.parts is not None,
                                        self.metrics.print)
            self._after_weights_set()
            return
        if ref is not None and ref.kind == "training":
            saved = ref.train_state()
            resume = self.resuming_own_run or not c.train.finetune
            # a checkpoint saved with --no-save-optim resumes with a fresh optimizer
            load_optimizer = resume and c.checkpoint.load_optim and saved.get("has_optimizer", True)
            ckpt.load_training_state(ref, self.model, self.optimizer if load_optimizer else None,
                                     tied_output_copy=self._holds_tied_output_copy())
            self._after_weights_set()
            what = "resumed from" if resume else "fine-tuning from the weights of"
            self.metrics.print(f"{what} {ref.path}")
            if resume:
                self.state = TrainState.from_saved(saved["state"], c.train.eval_interval, c.train.eval_iters,
                                                   c.train.global_batch_size)
                if load_optimizer and "loss_scaler" in saved:
                    self.scaler.load_state_dict(saved["loss_scaler"])
                self._loader_state = saved.get("loader")
                if c.checkpoint.load_rng:
                    self._restore_rng(ref)
            return
        partial = self.parts is not None  # pipeline stages hold part of the weights
        if ref is not None:  # converted weights: a fresh start from them (continued pretraining, SFT)
            self.metrics.print(f"starting from the converted weights in {ref.path}")
            initialize(self.model, lambda: converted_weight_chunks(ref), partial=partial)
        else:
            initialize(self.model, lambda: initial_weight_chunks(self.model_args, c.train.seed), partial=partial)
        self._after_weights_set()

    def _holds_tied_output_copy(self) -> bool:
        return self.parts is not None and self.parts.tied is not None and self.parts.has_last_stage

    def _after_weights_set(self) -> None:
        if self.parts is not None and self.parts.tied is not None:
            # the last stage's output head must equal the first stage's embedding, bit for bit
            self.parts.tied.copy_weights_to_last()

    def _restore_rng(self, ref: ckpt.CheckpointRef) -> None:
        path = ref.path / "rng" / f"rank_{self.rank:05d}.pt"
        if path.is_file():
            ckpt.restore_rng_state(ckpt.read_rng_state(path))
        else:  # another layout: this rank has no saved state; derive one from the position
            seed_everything(self._stage_seed(self.config.train.seed + self.state.iteration))

    def _stage_seed(self, seed: int) -> int:
        """The seed of this rank's random stream: pipeline stages hold different layers, so each
        gets its own (Megatron's seed + 100 x pp rank) or layer i and layer i + layers-per-stage would
        draw the same dropout masks; the ranks of one stage share it (ember.parallel.rng derives
        the tensor- and context-parallel ranks' streams from it)."""
        pp = self.meshes.pp if self.meshes is not None else None
        return seed + 100 * pp.get_local_rank() if pp is not None else seed

    # ------------------------------------------------------------------ data

    def _build_data(self) -> None:
        from ember.data.blending import build_datasets, train_valid_test_num_samples

        c = self.config
        t, d = c.train, c.data
        train_iters = t.train_iters if t.train_iters is not None else 0
        num_samples = train_valid_test_num_samples(
            train_iters, global_batch_size=t.global_batch_size, eval_interval=t.eval_interval,
            eval_iters=t.eval_iters)
        barrier = (lambda: dist.barrier()) if dist.is_initialized() else (lambda: None)
        self.train_ds, self.valid_ds, self.test_ds = build_datasets(
            d.data_path or None, d.split if d.data_path else None, d.seq_length, t.seed, num_samples,
            train_data_path=d.train_data_path or None, valid_data_path=d.valid_data_path or None,
            test_data_path=d.test_data_path or None, cache_dir=d.data_cache_path,
            shared_storage=d.shared_storage, rank=self.rank, local_rank=self.local_rank,
            world_size=self.world_size, barrier=barrier, eod_id=self._eod_id(),
            finetune_epochs=t.train_epochs, pack=finetune_pack(d))
        if t.train_epochs is not None:
            t.train_iters = len(self.train_ds) // t.global_batch_size
            if t.train_iters == 0:
                raise EmberError(f"{t.train_epochs} epoch(s) of {len(self.train_ds)} samples is less than one "
                                 f"global batch of {t.global_batch_size}; lower --global-batch-size")
        self.train_iters = t.train_iters
        self.micro_batches_per_step = self.layout.micro_batches
        self.train_loader = self._loader(self.train_ds, self.state.consumed_samples)
        if self._loader_state:
            self.train_loader.load_state_dict(self._loader_state)
        self.train_batches = iter(self.train_loader)

    def _eod_id(self) -> int | None:
        if hasattr(self, "_eod"):
            return self._eod
        self._eod = self._eod_id_from_tokenizer()
        return self._eod

    def _eod_id_from_tokenizer(self) -> int | None:
        d = self.config.data
        if not (d.tokenizer_type or d.tokenizer_name_or_path or d.tokenizer_model):
            return None
        from ember.data.tokenizers import build_tokenizer

        return build_tokenizer(d.tokenizer_type or "PretrainedFromHF", name_or_path=d.tokenizer_name_or_path,
                               model_file=d.tokenizer_model, vocab_file=d.vocab_file,
                               merge_file=d.merge_file, vocab_size=self.config.model.vocab_size).eod

    def _loader(self, dataset, consumed_samples: int):
        from ember.data.documents import PackedDocuments
        from ember.data.loader import DataLoader

        t, d = self.config.train, self.config.data
        packing = PackedDocuments(self._eod_id() if (d.reset_position_ids or d.reset_attention_mask or d.eod_mask_loss)
                                  else None, d.reset_position_ids, d.reset_attention_mask, d.eod_mask_loss)
        return DataLoader(dataset, t.global_batch_size, t.micro_batch_size, self.dp_rank, self.dp_size,
                          consumed_samples=consumed_samples, num_workers=self.config.data.num_workers,
                          pin_memory=self.device.type == "cuda", vocab_size=self.model_args.vocab_size,
                          packing=packing)

    def _next_micro_batches(self, batches) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(self.micro_batches_per_step):
            try:
                batch = next(batches)
            except StopIteration:
                raise EmberError("the training data ran out before --train-iters; this is a bug in the "
                                 "sample counts, please report it") from None
            out.append({k: self._local_piece(v.to(self.device, non_blocking=True)) for k, v in batch.items()
                        if k in ("input_ids", "labels", "loss_mask", "position_ids", "document_ids")})
        return out

    def _local_piece(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a [batch, seq] tensor: with context parallelism, its chunks of
        every sequence (Megatron's load-balanced order), else the whole."""
        if self.meshes is None or self.meshes.cp is None:
            return tensor
        from ember.parallel.context import shard_sequence

        return shard_sequence(tensor, self.meshes.cp, load_balance=True)

    # ------------------------------------------------------------------ one step

    def _global_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that hold different tokens (data- and context-parallel ones)."""
        if self.loss_group is not None:
            dist.all_reduce(tensor, group=self.loss_group)
        return tensor

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The output layer and the fp32 cross-entropy fused block by block (the full logits never
        # exist); tensor-parallel models keep the plain path, with logits split over the vocabulary.
        with autocast(self.config.train.precision, self.device):
            return lm_loss_sum(self.model, batch["input_ids"], batch["labels"], batch["loss_mask"],
                               **packed_document_kwargs(batch))

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]):
        """Forward/backward over the global batch, then the optimizer step (or a counted skip).

        Returns device tensors: this rank's summed loss, the global loss-token count, the gradient
        norm, whether the step was skipped, and whether that skip counts as bad (a NaN/Inf that
        lowering the fp16 loss scale can no longer cure).
        """
        tokens = self._global_sum(sum(mb["loss_mask"].sum() for mb in micro_batches).float())
        # FSDP averages gradients over data- (and context-) parallel ranks; the loss is already a
        # global mean, so scale by their number to turn that average back into the sum over ranks.
        average = self.layout.grad_average_size if self.meshes is not None and self.meshes.fsdp is not None else 1
        if self.pipeline is not None:
            loss_sum = self._pipeline_backward(micro_batches, tokens, average)
        else:
            loss_sum = self._backward(micro_batches, tokens, average)
        params = self.model.parameters()
        gradients.make_partial_grads_whole(params)
        if self.expert_params:
            edp = self.meshes.edp.get_group() if self.meshes.edp is not None else None
            gradients.reduce_expert_grads(self.expert_params, edp, average)
        norm_params = self.parts.parameters_for_grad_norm() if self.parts is not None else list(self.model.parameters())
        # A global batch without one loss token has nothing to learn from, yet its zero gradient
        # would still move the weights (AdamW's momentum and weight decay): skip its step, counted
        # with the skipped iterations. No host sync: a NaN scale makes clip_and_step see a
        # non-finite gradient norm, which skips the step on the device.
        empty = (tokens == 0).float()
        step_scale = torch.where(empty > 0, torch.full_like(self.scaler.scale, float("nan")), self.scaler.scale)
        outcome = gradients.clip_and_step(self.optimizer, self.config.optim.clip_grad, step_scale, norm_params,
                                          self.parts.pp_group if self.parts is not None else None)
        overflow = outcome.found_inf * (1.0 - empty)  # an empty batch says nothing about the loss scale
        bad = overflow * self.scaler.at_minimum().float()
        self.scaler.update(overflow)
        grad_norm = torch.where(empty > 0, torch.zeros_like(outcome.grad_norm), outcome.grad_norm)
        return loss_sum, tokens, grad_norm, outcome.found_inf, bad

    def _backward(self, micro_batches: list[dict[str, torch.Tensor]], tokens: torch.Tensor,
                  average: int) -> torch.Tensor:
        """Gradient accumulation over the micro-batches; returns this rank's summed loss."""
        mode = self.config.parallel.dp_mode
        scale = self.scaler.scale * average / tokens.clamp(min=1.0)
        loss_sum = torch.zeros((), device=self.device)
        last = len(micro_batches) - 1
        for index, batch in enumerate(micro_batches):
            prepare_backward(self.model, mode, last_micro_batch=index == last)
            micro_loss = self._loss_sum(batch)
            objective = micro_loss * scale
            if self.model_args.num_experts:
                # the load-balancing loss is a per-micro-batch mean: average it over micro-batches
                objective = objective + self.model.aux_loss() * self.scaler.scale / len(micro_batches)
            objective.backward()
            loss_sum += micro_loss.detach()
        return loss_sum

    def _pipeline_backward(self, micro_batches: list[dict[str, torch.Tensor]], tokens: torch.Tensor,
                           average: int) -> torch.Tensor:
        """One pass of the pipeline schedule over this rank's micro-batches (the same objective
        as `_backward`, micro-batch by micro-batch); returns this rank's summed loss, shared by
        every stage so that any rank can log it."""
        from ember.parallel.pipeline import pipeline_train_step

        batch = {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}
        with autocast(self.config.train.precision, self.device):
            share = pipeline_train_step(self.pipeline, batch["input_ids"], batch["labels"], batch["loss_mask"],
                                        num_tokens=tokens, loss_scale=self.scaler.scale, dp_average_size=average,
                                        broadcast_loss=True, **packed_document_kwargs(batch))
        return share * tokens.clamp(min=1.0)

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        c = self.config
        t = c.train
        result = TrainResult(iteration=self.state.iteration, reason="finished")
        pending: list[tuple] = []
        consecutive_bad = torch.zeros((), device=self.device)
        skipped = torch.full((), float(self.state.skipped_iterations), device=self.device)
        check_every = min(c.logging.log_interval, t.max_consecutive_skips)
        # fp16, as Megatron: a step skipped because the loss scale overflowed does not advance the
        # learning-rate schedule. That needs the skip on the host: one sync per step, fp16 only.
        hold_schedule = t.precision == "fp16"
        held_steps = self.state.skipped_iterations if hold_schedule else 0
        tokens_per_iter = t.global_batch_size * c.data.seq_length
        interval_start = time.perf_counter()
        self.metrics.print(self._banner())
        self._set_training(True)
        while self.state.iteration < self.train_iters:
            micro_batches = self._next_micro_batches(self.train_batches)
            self.state.iteration += 1
            self.state.consumed_samples += t.global_batch_size
            self.state.consumed_tokens += tokens_per_iter
            lr = self.schedule.lr_at(self.schedule.progress_of(
                self.state.iteration - held_steps, self.state.consumed_tokens - held_steps * tokens_per_iter))
            set_lr(self.optimizer, lr)
            with self.profiler.step(self.state.iteration):
                loss_sum, tokens, grad_norm, found_inf, bad = self.train_step(micro_batches)
            consecutive_bad = (consecutive_bad + 1.0) * bad
            skipped = skipped + found_inf
            if hold_schedule:
                held_steps += int(found_inf.item())
            pending.append((self.state.iteration, lr, loss_sum, tokens, grad_norm, found_inf))
            it = self.state.iteration
            if it % c.logging.log_interval == 0 or it == self.train_iters:
                self._log(pending, skipped, time.perf_counter() - interval_start, result)
                pending = []
                interval_start = time.perf_counter()
            if it % check_every == 0 and consecutive_bad.item() >= t.max_consecutive_skips:
                self._stop_on_bad_steps(int(consecutive_bad.item()), int(skipped.item()))
            if t.eval_iters > 0 and self.valid_ds is not None and it % t.eval_interval == 0:
                self.evaluate()
            stop = self._stop_reason(it)
            saving = c.checkpoint.save_interval and it % c.checkpoint.save_interval == 0
            if saving or stop or it == self.train_iters:
                self.state.skipped_iterations = int(skipped.item())
                if c.checkpoint.save:
                    self._save()
            if stop:
                result.reason = stop
                break
        result.iteration = self.state.iteration
        self.state.skipped_iterations = int(skipped.item())
        if result.reason == "finished" and t.eval_iters > 0:  # as Megatron: after the last save
            if self.valid_ds is not None:
                self.evaluate(after_training=True)
            if self.test_ds is not None:
                self.evaluate(split="test", after_training=True)
        self.profiler.finish()
        if self.checkpointer is not None:
            self.checkpointer.wait()
        return result

    def _stop_on_bad_steps(self, in_a_row: int, skipped: int) -> None:
        """Save (skipped steps changed no weights: this is the last good state) and stop."""
        self.state.skipped_iterations = skipped
        self._save()
        save = self.config.checkpoint.save
        where = f"the last good state is saved in {save}" if save else "nothing saved (no --save)"
        raise EmberError(f"{in_a_row} iterations in a row had a NaN/Inf loss or gradient (up to iteration "
                         f"{self.state.iteration}); stopped, {where}. Lower --lr, use --bf16 instead of "
                         f"--fp16, or check the data")

    def _stop_reason(self, iteration: int) -> str | None:
        t = self.config.train
        if self.stop_signal.requested():
            return "sigterm"
        if t.exit_interval and iteration % t.exit_interval == 0 and iteration < self.train_iters:
            return "exit_interval"
        return None

    def _save(self) -> None:
        if self.checkpointer is None:
            return
        state = {
            "state": self.state.to_dict(),
            "loader": self.train_loader.state_dict(),
            "loss_scaler": self.scaler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "has_optimizer": self.config.checkpoint.save_optim,
            "model_args": self.model_args.to_dict(),
            "config": self.config.to_dict(),
            "world_size": self.world_size,
            "dp_size": self.dp_size,
            "layout": self.layout.mesh_degrees() | {"ep": self.layout.ep},
        }
        path = self.checkpointer.save(self.state.iteration, self.model,
                                      self.optimizer if self.config.checkpoint.save_optim else None, state)
        self.metrics.print(f"saved checkpoint {path}")
        if model_setup.lora_spec(self.config) is not None:  # LoRA (issue 17): the adapter as a PEFT folder too
            model_setup.save_lora_adapter(self.model, self.config, self.model_args, self.metrics.print)

    # ------------------------------------------------------------------ logging and evaluation

    def _log(self, pending: list[tuple], skipped: torch.Tensor, elapsed: float, result: TrainResult) -> None:
        t = self.config.train
        loss_sums = self._global_sum(torch.stack([p[2] for p in pending]))
        counts = torch.stack([p[3] for p in pending])
        host = torch.stack([loss_sums / counts.clamp(min=1.0), torch.stack([p[4] for p in pending]),
                            torch.stack([p[5] for p in pending]), counts]).cpu().tolist()
        losses, norms, _, loss_tokens = host
        empty = [iteration for (iteration, *_), count in zip(pending, loss_tokens) if count == 0]
        if empty:
            self.metrics.print(f"iteration(s) {', '.join(map(str, empty))}: no loss token in the global batch "
                               f"(every target masked or cut); step skipped")
        losses = [loss if count > 0 else float("nan") for loss, count in zip(losses, loss_tokens)]
        for (iteration, *_), loss in zip(pending, losses):
            result.losses[iteration] = loss
        # a skipped step still has a meaningful loss unless the loss itself is what overflowed
        good = [loss for loss in losses if math.isfinite(loss)]
        iterations = len(pending)
        tokens = iterations * t.global_batch_size * self.config.data.seq_length
        per_device = tokens / max(elapsed, 1e-9) / self.world_size
        tflops = self.flops_per_token * per_device / 1e12
        record: dict[str, Any] = {
            "iteration": pending[-1][0],
            "consumed_samples": self.state.consumed_samples,
            "consumed_tokens": self.state.consumed_tokens,
            "loss": sum(good) / len(good) if good else float("nan"),
            "lr": pending[-1][1],
            "grad_norm": norms[-1],
            "loss_scale": float(self.scaler.scale),
            "skipped_iterations": int(skipped.item()),
            "iteration_time_ms": 1000.0 * elapsed / iterations,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "tokens_per_s_per_device": per_device,
            "tflops": tflops,
            "mfu": tflops / self.peak if self.peak else None,
        } | memory_record(self.device)  # collective: peaks of every rank
        self.metrics.log(record, format_train_line(record, self.train_iters, self.metrics.log_format))

    @torch.no_grad()
    def evaluate(self, split: str = "valid", after_training: bool = False) -> dict[str, float]:
        """Loss and perplexity over `--eval-iters` global batches of the validation (or test) split.

        As in Megatron, each validation takes the samples after the previous one's (the split is
        sized for every evaluation of the run; past its end it starts over), and the position is
        saved with the checkpoint, so a resumed run evaluates exactly as an uninterrupted one.
        The test split is evaluated once, from its start, after training.
        """
        t = self.config.train
        dataset = self.valid_ds if split == "valid" else self.test_ds
        iters = min(t.eval_iters, len(dataset) // t.global_batch_size)
        if iters == 0:
            return {}
        samples = iters * t.global_batch_size
        start = 0
        if split == "valid":
            start = self.state.consumed_valid_samples
            if start + samples > len(dataset):
                start = 0
            self.state.consumed_valid_samples = start + samples
        self._set_training(False)
        loader = self._loader(dataset, start)
        total = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        # rate and ETA every 30 s of a long evaluation (rank 0)
        progress = Progress(f"{'validation' if split == 'valid' else 'test'}", iters, "batches", self.metrics.print)
        for _ in range(iters):
            micro_batches = self._next_micro_batches(loader)
            if self.pipeline is not None:
                total += self._pipeline_eval(micro_batches)
            else:
                for batch in micro_batches:
                    total += self._loss_sum(batch)
            tokens += sum(batch["loss_mask"].sum() for batch in micro_batches)
            progress.update()
        progress.close()
        loader.close()
        totals = self._global_sum(torch.stack([total, tokens.float()])).tolist()
        self._set_training(True)
        loss = totals[0] / max(totals[1], 1.0)
        ppl = math.exp(min(loss, 700.0))
        name = "eval" if split == "valid" else "test"
        record = {"iteration": self.state.iteration, f"{name}_loss": loss, f"{name}_ppl": ppl}
        where = "validation" if split == "valid" else "test"
        when = ", after training" if after_training else ""
        self.metrics.log(record, f"{where} at iteration {self.state.iteration}{when} | lm loss: {loss:.6E} | "
                                 f"lm loss PPL: {ppl:.6E}")
        return record

    def _pipeline_eval(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        from ember.parallel.pipeline import pipeline_eval_step

        batch = {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}
        with autocast(self.config.train.precision, self.device):
            return pipeline_eval_step(self.pipeline, batch["input_ids"], batch["labels"], batch["loss_mask"],
                                      broadcast_loss=True, **packed_document_kwargs(batch))

    def _set_training(self, mode: bool) -> None:
        self.model.train(mode)
        for module in self.modules:
            module.train(mode)

    def _banner(self) -> str:
        c = self.config
        a = self.model_args
        threads = ""
        if self.cpu_threads is not None:
            threads = f", {self.cpu_threads.threads} thread(s) each ({self.cpu_threads.reason})"
        return (f"training {c.model.name or 'model'}: {a.num_params() / 1e6:.2f}M parameters, "
                f"{self.world_size} process(es) on {self.device.type} "
                f"({self.layout.describe()}, {c.parallel.dp_mode}){threads}, global batch {c.train.global_batch_size} x "
                f"{c.data.seq_length} tokens, {self.train_iters} iterations at lr {c.train.lr:g}, "
                f"from iteration {self.state.iteration}")

    # ------------------------------------------------------------------ teardown

    def close(self, *, finished: bool = False) -> None:
        """Release what setup() took. `finished`: every rank returned from train(), so a barrier is
        safe and lets the last pipeline sends land before the process group is torn down (gloo
        aborts a rank whose peer destroys the group under an in-flight send)."""
        if self.checkpointer is not None:
            self.checkpointer.wait()
        if hasattr(self, "train_loader"):
            self.train_loader.close()
        if hasattr(self, "stop_signal"):
            self.stop_signal.restore()
        if hasattr(self, "metrics"):
            self.metrics.close()
        if self._owns_process_group and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def _check_same_architecture(wanted, saved, ref: ckpt.CheckpointRef) -> None:
    a, b = wanted.to_dict(), saved.to_dict()
    a.pop("extra", None), b.pop("extra", None)
    different = sorted(k for k in a if a[k] != b.get(k) and k not in TRAINING_SETTINGS)
    if different:
        raise EmberError(f"--model differs from the checkpoint {ref.path} in {different}; drop --model to "
                         f"take the architecture from the checkpoint")


def checkpoint_to_start_from(config: Config, notice=print) -> tuple[ckpt.CheckpointRef | None, bool]:
    """(checkpoint, whether it is this run's own) for a validated config. A checkpoint of this run
    under --save wins over --load, so a preempted job relaunched with the same command continues
    instead of starting over; one of another run (other model or data) is never continued
    silently, and a --load that holds no ember checkpoint never silently means random weights.
    `ember train` calls this before it starts any process, each rank again at setup."""
    c = config.checkpoint
    if c.save:
        foreign.check_save(c.save)
    own = None
    if c.save and os.path.isdir(c.save) and not c.overwrite:  # --overwrite: what it holds is replaced
        own = ckpt.find_checkpoint(c.save)
    if own is not None and own.kind == "training":
        if not c.resume:
            raise EmberError(f"--save {c.save} already holds {own.path.name} and resuming is off (--no-resume "
                             f"or resume_training: False); pass --overwrite to replace it, or give a new --save")
        different = _architecture_differences(config, own) + run_differences(_saved_config(own), config)
        if different:
            shown = "; ".join(different[:3]) + (f"; {len(different) - 3} more" if len(different) > 3 else "")
            raise EmberError(
                f"--save {c.save} holds {own.path.name} of a different run ({shown}); to "
                f"continue it, run with its settings; to start from its weights, give a new --save with "
                f"--load {c.save} --finetune; to replace it, pass --overwrite")
        if c.load and os.path.abspath(c.load) != os.path.abspath(c.save):
            notice(f"--save {c.save} already has {own.path.name}: resuming this run from it "
                   f"instead of --load {c.load} (give a new --save to start over)")
        return own, True
    load = c.load
    if load and foreign.foreign_checkpoint(load) == "megatron":  # a Megatron user's own --load
        from ember.checkpoint.megatron_load import megatron_weights_for_load

        load = str(megatron_weights_for_load(load, finetune=config.train.finetune, output_dir=config.output_dir,
                                             notice=notice, load_optim=c.load_optim,
                                             optimizer_factory=adam_for_megatron_import))
    ref = ckpt.find_checkpoint(load) if load else None
    if load:
        foreign.check_load(load, ref is not None, save=c.save, finetune=config.train.finetune)
    if c.load and ref is None:  # the first run of `--load DIR --save DIR`
        notice(f"no checkpoint in {c.load} (this run's --save) yet: starting from scratch")
    return ref, False


def adam_for_megatron_import(model: torch.nn.Module, hyper: dict) -> torch.optim.Optimizer:
    """ember's optimizer for a Megatron run's imported Adam state (ember.checkpoint.megatron_optim),
    with that run's betas, eps and weight decay: the state a training checkpoint of it holds."""
    from ember.config import OptimConfig

    optim = OptimConfig(weight_decay=hyper["weight_decay"], adam_beta1=hyper["betas"][0], adam_beta2=hyper["betas"][1],
                        adam_eps=hyper["eps"])
    return build_optimizer(model, optim, hyper["lr"], torch.device("cpu"))


def _architecture_differences(config: Config, own: ckpt.CheckpointRef) -> list[str]:
    """`"model.field: saved X, now Y"` where the architecture this config describes (by name and
    flags, or that of the weights --load names) is not the one the checkpoint holds. Nothing when
    the config leaves the architecture to the checkpoint itself."""
    c = config.checkpoint
    start = None
    if c.load and os.path.abspath(c.load) != os.path.abspath(c.save):
        start = ckpt.find_checkpoint(c.load)
    try:
        wanted = model_setup.resolve_model_args(config, start).to_dict()
        saved = own.model_args().to_dict()
    except EmberError:  # no architecture without the checkpoint, or a damaged one (loading says so)
        return []
    wanted.pop("extra", None), saved.pop("extra", None)
    # dropout and router jitter are how a run trains, not what it trains (issue 16): they may change
    return [f"model.{k}: saved {saved.get(k)}, now {wanted[k]}" for k in sorted(wanted)
            if wanted[k] != saved.get(k) and k not in TRAINING_SETTINGS]


def _saved_config(ref: ckpt.CheckpointRef) -> dict:
    """The config a checkpoint was written with; {} when its train_state.json is damaged (loading
    it then reports the damage, or falls back to an older checkpoint)."""
    try:
        return ref.train_state().get("config") or {}
    except EmberError:
        return {}


def run_training(config: Config, stream=None) -> TrainResult:
    """Train to the end (or to a stop) in this process; under torchrun, on every rank."""
    trainer = Trainer(config, stream=stream)
    try:
        trainer.setup()
        result = trainer.train()
    except BaseException:
        trainer.close()
        raise
    trainer.close(finished=True)
    return result
