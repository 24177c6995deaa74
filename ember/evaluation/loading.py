"""One checkpoint, ready to evaluate: an ember weight folder (`ember convert --to ember`) or an
`ember train --save` folder, with the tokenizer folder that goes with it; whole on one device, or
split over several with tensor parallelism (one process per device, under torchrun).

Tensor-parallel evaluation shards the weights as training does (ember.parallel.tensor, without
sequence parallelism) and gathers the logits, so every rank sees the same numbers, makes the same
greedy choices and runs the same requests; rank 0 reports.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ember.errors import EmberError

DTYPES: dict[str, torch.dtype | None] = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16,
                                          "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name in ("keep", "auto"):
        return None
    if name not in DTYPES:
        raise EmberError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_layout(tp: int = 1, pp: int = 1) -> None:
    """Tensor parallelism over all the processes, or one process; nothing else (yet)."""
    tp, pp = int(tp), int(pp)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if pp > 1:
        raise EmberError(f"pipeline-parallel evaluation (pp={pp}) is not implemented; split the model with "
                         "--tensor-model-parallel-size instead (one process per device under torchrun)")
    if tp < 1:
        raise EmberError(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if world != tp:
        raise EmberError(f"evaluation runs tensor-parallel over all its processes: WORLD_SIZE={world} but "
                         f"tensor-model-parallel-size={tp}; launch `torchrun --nproc-per-node {tp} -m ember eval "
                         f"--tensor-model-parallel-size {tp} ...` (or one process for tp=1)")


def is_reporting_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _tensor_parallel(model: nn.Module, tp: int, device: torch.device) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ember.parallel.mesh import default_backend
    from ember.parallel.tensor import apply_tensor_parallel

    if not dist.is_initialized():
        dist.init_process_group(default_backend(device))
    mesh = init_device_mesh(device.type, (tp,))
    # whole logits (no loss_parallel) and whole sequences (no sequence parallelism): the scorer
    # and the KV-cached decoding read every position and every vocabulary entry
    apply_tensor_parallel(model, mesh, sequence_parallel=False, loss_parallel=False)
    model.init_buffers(device)


def eval_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: the one asked for (falling back to the CPU when CUDA is asked for
    but absent, as lm-eval's `hf` class does), this process's accelerator under torchrun."""
    from ember.parallel.mesh import default_device

    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return default_device()
    device = torch.device(device)
    if device.type != "cpu" and device.index is None and "LOCAL_RANK" in os.environ:
        return default_device()
    return device


def load_checkpoint(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    tokenizer: str | Path | None = None, tp: int = 1, pp: int = 1) -> tuple[nn.Module, Path | None]:
    """(model in eval mode, tokenizer folder or None). The tokenizer is `tokenizer` if given, else
    the weight folder's `tokenizer/`, else the one a training checkpoint was trained with."""
    from ember.checkpoint.export import is_training_checkpoint, load_model_from_training_checkpoint
    from ember.checkpoint.weights import load_model, read_manifest

    check_layout(tp, pp)
    device = eval_device(device)
    load_device = "cpu" if tp > 1 else device  # the whole model on the host, then its shards on the devices
    path = Path(path)
    if not path.exists():
        raise EmberError(f"--load {path} does not exist; pass an ember weight folder or an ember train --save folder")
    if is_training_checkpoint(path):
        model, trained_with = load_model_from_training_checkpoint(path, load_device, dtype)
        default_tokenizer = trained_with
    else:
        read_manifest(path)  # a clear error for a folder that is not ember weights
        model = load_model(path, device=load_device, dtype=dtype)
        default_tokenizer = path / "tokenizer"
    if tokenizer and not Path(tokenizer).is_dir():
        raise EmberError(f"tokenizer folder {tokenizer} does not exist; pass a local Hugging Face tokenizer folder")
    folder = Path(tokenizer) if tokenizer else default_tokenizer
    if tp > 1:
        _tensor_parallel(model, tp, device)
    return model.eval(), (Path(folder) if folder is not None and Path(folder).is_dir() else None)


def need_tokenizer(folder: Path | None, why: str) -> Path:
    if folder is None:
        raise EmberError(f"{why} needs a tokenizer and the checkpoint names none; pass --tokenizer-name-or-path DIR "
                         "(a Hugging Face folder: tokenizer.json or tokenizer_config.json)")
    return folder
