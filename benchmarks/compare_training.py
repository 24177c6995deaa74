"""ember's training step next to a plain Hugging Face transformers loop: same model, same initial
weights, same batches, same precision, timed alternately: in one process (`alternate`), or each
side in a process of its own as a user runs it (`alternate_in_processes`).

The ember side is `Trainer.train_step` of a `Trainer` set up from a `Config` on a random-token
indexed dataset: the very code `ember train` runs (forward, loss, backward, clipping, fused AdamW,
in that order). The Hugging Face side is the loop people write around `LlamaForCausalLM` with SDPA
attention: forward, `F.cross_entropy`, backward, `clip_grad_norm_`, fused `torch.optim.AdamW`, with
the same parameter groups and hyperparameters. Both see batch i at step i, so their loss curves
must agree; that shows the two train the same model.

Used by train_cpu.py, train_gpu.py and profile_step.py.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ember.config import Config
from ember.data.indexed import IndexedDatasetWriter
from ember.models.hf import TensorMapper, hf_config_from_args
from ember.train import Trainer
from ember.train.optim import parameter_groups


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture model and batch: a registry name plus Megatron-style overrides."""

    name: str
    base_model: str  # a registry name; the overrides below replace its fields
    seq_length: int
    micro_batch_size: int
    overrides: dict = field(default_factory=dict)  # ModelConfig fields (Megatron names)


def write_random_tokens(prefix: str, num_tokens: int, vocab_size: int, seed: int = 0) -> str:
    """An indexed dataset of uniformly random tokens in documents of 64..4096 tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(64, 4096, size=num_tokens // 64 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), num_tokens) + 1]
    dtype = np.uint16 if vocab_size < 65500 else np.int32
    writer = IndexedDatasetWriter(prefix, dtype)
    writer.add_documents(rng.integers(0, vocab_size, int(lengths.sum())).astype(dtype), lengths)
    writer.finalize()
    return prefix


def ember_config(shape: Shape, data_prefix: str, steps: int, *, precision: str = "fp32", compile: bool | None = None,
                 recompute: str | None = None, lr: float = 3e-4) -> Config:
    c = Config()
    c.model.name = shape.base_model
    c.model.make_vocab_size_divisible_by = None  # the shape's vocabulary exactly, as HF builds it
    for key, value in shape.overrides.items():
        setattr(c.model, key, value)
    c.model.max_position_embeddings = shape.seq_length
    c.data.data_path = [data_prefix]
    c.data.split = "100,0,0"
    c.data.seq_length = shape.seq_length
    c.data.num_workers = 0
    c.train.micro_batch_size = shape.micro_batch_size
    c.train.global_batch_size = shape.micro_batch_size
    c.train.train_iters = steps
    c.train.eval_iters = 0
    c.train.lr = lr
    c.train.lr_decay_style = "constant"
    c.train.precision = precision
    c.train.compile = compile
    c.train.recompute_granularity = recompute
    c.logging.tensorboard = False
    c.logging.log_interval = 10**9
    return c


def ember_trainer(shape: Shape, workdir: str, steps: int, **options) -> Trainer:
    """A set-up Trainer on a fresh random-token dataset large enough for `steps` steps."""
    from ember.models import get_model_args

    vocab = shape.overrides.get("vocab_size") or get_model_args(shape.base_model).vocab_size
    tokens = (steps + 2) * shape.micro_batch_size * (shape.seq_length + 1) * 2 + 8192
    os.makedirs(workdir, exist_ok=True)
    prefix = write_random_tokens(os.path.join(workdir, "tokens"), tokens, vocab)
    config = ember_config(shape, prefix, steps, **options)
    config.data.data_cache_path = os.path.join(workdir, "cache")
    config.train.cpu_threads = torch.get_num_threads()  # the count the benchmark set, for both sides
    return Trainer(config, stream=io.StringIO()).setup()


def take_batches(trainer: Trainer, steps: int) -> list[list[dict[str, torch.Tensor]]]:
    """`steps` global batches from the trainer's own loader, already on its device: data loading
    is benchmarked separately (dataloader.py) and kept out of the step times of both sides."""
    keys = ("input_ids", "labels", "loss_mask")
    out = []
    for _ in range(steps):
        micro = []
        for _ in range(trainer.micro_batches_per_step):
            batch = next(trainer.train_batches)
            micro.append({k: batch[k].to(trainer.device) for k in keys})
        out.append(micro)
    return out


def use_plain_loss(trainer: Trainer) -> None:
    """On this instance only, the micro-batch loss through the full logits,
    `cross_entropy_sum(model(tokens), ...)`, instead of the trainer's fused output layer and
    cross-entropy (`ember.train.fused_loss`): what the fused loss gains. The rest of `train_step`
    is untouched."""
    from ember.parallel.loss import cross_entropy_sum
    from ember.train.precision import autocast

    def loss_sum(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(trainer.config.train.precision, trainer.device):
            logits = trainer.model(batch["input_ids"])
        return cross_entropy_sum(logits, batch["labels"], batch["loss_mask"])

    trainer._loss_sum = loss_sum


def ember_step(trainer: Trainer) -> Callable[[list[dict[str, torch.Tensor]]], torch.Tensor]:
    """One `Trainer.train_step`; returns the step's mean loss as a device tensor (no host sync)."""

    def step(micro_batches):
        loss_sum, tokens, *_ = trainer.train_step(micro_batches)
        return loss_sum / tokens

    return step


def initial_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trainer model's weights on the CPU, under their plain names (recompute and compile
    wrappers add prefixes that the HF mapping does not know)."""
    state = {}
    for name, tensor in trainer.model.state_dict().items():
        name = name.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", "")
        state[name] = tensor.detach().to("cpu", copy=True)
    return state


def hf_twin(args, state: dict[str, torch.Tensor], device: torch.device, *, attn_implementation: str = "sdpa",
            gradient_checkpointing: bool = False) -> torch.nn.Module:
    """A transformers LlamaForCausalLM with ember's weights `state` (fp32), on `device`."""
    import transformers

    config = transformers.LlamaConfig(**hf_config_from_args(args, "llama"))
    config._attn_implementation = attn_implementation
    config.use_cache = False
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    mapper = TensorMapper("llama", args)
    hf_state = {}
    for name, tensor in state.items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        hf_state.update(mapper.to_hf(name, tensor))
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [m for m in missing if not (args.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF twin: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    if gradient_checkpointing:  # transformers 5 renamed it
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model.train()


def hf_step(model: torch.nn.Module, config: Config, device: torch.device) -> Callable[[list[dict[str, torch.Tensor]]], torch.Tensor]:
    """The plain transformers loop, with the ember run's optimizer settings, clipping and precision."""
    o = config.optim
    optimizer = torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=config.train.lr,
                                  betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, fused=True)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.train.precision]
    params = [p for p in model.parameters() if p.requires_grad]

    def step(micro_batches):
        total = sum(int(mb["loss_mask"].numel()) for mb in micro_batches)
        loss_sum = torch.zeros((), device=device)
        for mb in micro_batches:
            autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            with autocast:
                logits = model(input_ids=mb["input_ids"]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten(), reduction="sum")
            (loss / total).backward()
            loss_sum += loss.detach()
        if o.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, o.clip_grad, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum / total

    return step


@dataclass
class Timings:
    seconds: dict[str, list[float]]  # per side, one entry per timed step
    losses: dict[str, list[float]]  # per side, one entry per step (warm-up included)
    rounds: dict[str, list[float]]  # per side, the timed seconds of each turn

    def median(self, side: str) -> float:
        return statistics.median(self.seconds[side])

    def paired_speedup(self, side: str, baseline: str) -> float:
        """Median over turns of baseline time / side time for the same batches, taken seconds
        apart: steadier than the ratio of medians when the machine's load drifts."""
        pairs = [b / a for a, b in zip(self.rounds[side], self.rounds[baseline]) if a > 0 and b > 0]
        return statistics.median(pairs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(steps: dict[str, Callable], batches: list, device: torch.device, *, warmup: int, per_round: int,
              clock: Callable[[], float] = time.perf_counter) -> Timings:
    """Run every side over the same batches, `per_round` steps at a time in turn, so slow phases
    of a shared machine hit all sides alike. The first `warmup` steps of each side are not timed.
    Losses stay on the device until the end (reading them would add a host sync to each step).

    `clock` is wall time by default; `time.process_time` (CPU time of this process) is steadier
    on a busy machine when torch runs one thread, as time slices lost to other processes are
    not counted."""
    seconds = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    rounds = {name: [] for name in steps}
    position = 0
    while position < len(batches):
        chunk = batches[position:position + per_round]
        for name, step in steps.items():
            timed = _after_warmup(_timed_steps(step, chunk, device, clock, losses[name]), position, warmup)
            seconds[name].extend(timed)
            rounds[name].append(sum(timed))
        position += len(chunk)
    return Timings(seconds, {name: [float(x) for x in values] for name, values in losses.items()}, rounds)


def _timed_steps(step: Callable, batches: list, device: torch.device, clock: Callable[[], float],
                 losses: list) -> list[float]:
    """Seconds of each step over `batches`, appending each step's loss (a device tensor) to `losses`."""
    seconds = []
    for batch in batches:
        _sync(device)
        start = clock()
        losses.append(step(batch))
        _sync(device)
        seconds.append(clock() - start)
    return seconds


def _after_warmup(seconds: list[float], position: int, warmup: int) -> list[float]:
    """The times of a turn that began at step `position`, without those of the first `warmup` steps."""
    return [s for offset, s in enumerate(seconds) if position + offset >= warmup]


def side_step(side: str, trainer: Trainer) -> Callable:
    """The step function of one side ("ember" or "hf"; "ember@label" is ember again, for a second
    ember process under other settings) over `trainer`'s model and settings."""
    side = side.split("@")[0]
    if side == "ember":
        return ember_step(trainer)
    if side == "hf":
        return hf_step(hf_twin(trainer.model_args, initial_state(trainer), trainer.device), trainer.config,
                       trainer.device)
    raise ValueError(f"unknown side {side!r}")


def _side_process(conn, side: str, shape: Shape, steps: int, threads: int, clock_name: str, options: dict,
                  plain_loss: bool) -> None:
    """One side in a process of its own: builds the same trainer (same seed, same random-token
    dataset, hence the same initial weights and batches) as every other side, then runs the
    steps the parent asks for and sends back their times; the losses at the end."""
    torch.set_num_threads(threads)
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    try:
        with scratch_dir(f"ember-{side}-") as workdir:
            trainer = ember_trainer(shape, workdir, steps, **options)
            try:
                if plain_loss:
                    use_plain_loss(trainer)
                batches = take_batches(trainer, steps)
                step = side_step(side, trainer)
                conn.send(("ready", None))
                losses = []
                while True:
                    command, first, count = conn.recv()
                    if command == "stop":
                        break
                    conn.send(("seconds", _timed_steps(step, batches[first:first + count], trainer.device, clock,
                                                       losses)))
                conn.send(("losses", [float(x) for x in losses]))
            finally:
                trainer.close()
    except BaseException as err:  # the parent reports it and stops the other side
        with contextlib.suppress(OSError):  # unless the parent is gone already
            conn.send(("error", f"{side}: {type(err).__name__}: {err}"))
    finally:
        conn.close()


def alternate_in_processes(sides: list[str], shape: Shape, steps: int, *, warmup: int, per_round: int,
                           threads: int, clock_name: str = "wall", options: dict | None = None,
                           plain_loss: bool = False, env: dict[str, dict[str, str]] | None = None) -> Timings:
    """`alternate`, with each side in its own (spawned) process: what a user of either tool runs.
    Sharing one process lets one side's allocations shape the other's heap: with glibc's malloc,
    transformers' 32 MB logits hit fresh pages (page faults) far more often beside ember's step
    than alone (`tiny`: ~153 vs ~120-130 ms per HF step, 2026-12-05); in processes of their own,
    process-wide settings (threads, allocator tunables) stay each side's own. `env[side]` adds
    environment variables to that side's process only (set while it starts)."""
    context = multiprocessing.get_context("spawn")
    children = {}
    for side in sides:
        parent_end, child_end = context.Pipe()
        saved = {key: os.environ.get(key) for key in (env or {}).get(side, {})}
        os.environ.update((env or {}).get(side, {}))
        try:
            process = context.Process(target=_side_process, args=(child_end, side, shape, steps, threads, clock_name,
                                                                    options or {}, plain_loss), daemon=True)
            process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        child_end.close()
        children[side] = (process, parent_end)

    def receive(side: str, expected: str):
        process, conn = children[side]
        if not conn.poll(1800):
            raise RuntimeError(f"{side}: no answer in 30 minutes")
        try:
            kind, payload = conn.recv()
        except EOFError:
            process.join(timeout=10)
            raise RuntimeError(f"{side}: its process ended without answering (exit code {process.exitcode})") from None
        if kind == "error":
            raise RuntimeError(payload)
        if kind != expected:
            raise RuntimeError(f"{side}: expected {expected!r}, got {kind!r}")
        return payload

    try:
        for side in sides:
            receive(side, "ready")
        seconds = {side: [] for side in sides}
        rounds = {side: [] for side in sides}
        position = 0
        while position < steps:
            count = min(per_round, steps - position)
            for side in sides:
                children[side][1].send(("run", position, count))
                timed = _after_warmup(receive(side, "seconds"), position, warmup)
                seconds[side].extend(timed)
                rounds[side].append(sum(timed))
            position += count
        losses = {}
        for side in sides:
            children[side][1].send(("stop", 0, 0))
            losses[side] = receive(side, "losses")
        return Timings(seconds, losses, rounds)
    finally:
        for process, conn in children.values():  # a side still waiting for its turn (another failed): stop it
            if process.is_alive():
                with contextlib.suppress(OSError):
                    conn.send(("stop", 0, 0))
        for process, conn in children.values():
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()


def time_steps(step: Callable, batches: list, device: torch.device, *, warmup: int) -> tuple[list[float], list[float]]:
    """One side alone over `batches`: (seconds of each step after `warmup`, every step's loss)."""
    timings = alternate({"side": step}, batches, device, warmup=warmup, per_round=len(batches))
    return timings.seconds["side"], timings.losses["side"]


def loss_agreement(losses: dict[str, list[float]], a: str, b: str) -> float:
    """Largest |loss_a - loss_b| over the steps both ran."""
    return max(abs(x - y) for x, y in zip(losses[a], losses[b]))


def load_average() -> float:
    return os.getloadavg()[0]


@contextlib.contextmanager
def scratch_dir(prefix: str):
    with tempfile.TemporaryDirectory(prefix=prefix) as path:
        yield path
