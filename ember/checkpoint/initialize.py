"""Filling a built (and parallelized) model with the whole model's weights, given part by part.

The weights come as an iterable of {name: full tensor} parts: converted weights one safetensors
file at a time (`converted_weight_chunks`), or the run's random initialisation
(`ember.models.initialization.initial_weight_chunks`). Distributed, only rank 0 reads them and
broadcasts each part, so no process ever holds a full copy of the model beside its shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ember.checkpoint.training import CheckpointRef, load_full_weights
from ember.errors import EmberError


def converted_weight_chunks(ref: CheckpointRef) -> Iterator[dict[str, torch.Tensor]]:
    """The weights of an ember weight folder (converted from Hugging Face), one safetensors file
    at a time, as fp32 (training keeps fp32 parameters whatever the checkpoint's dtype; bf16
    autocast computes). Names and shapes are checked against the architecture first."""
    from ember.checkpoint.weights import iter_ember_weight_files

    for args, state in iter_ember_weight_files(ref.path):
        state = {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
        if args.tie_embeddings and "tok_embeddings.weight" in state:  # the folder stores it once
            state["output.weight"] = state["tok_embeddings.weight"]
        yield state


def initialize(model: nn.Module, weight_chunks: Callable[[], Iterable[dict[str, torch.Tensor]]],
               partial: bool = False) -> None:
    """Fill the model with the whole model's weights, given part by part: `weight_chunks()`
    yields dicts of names to full tensors. Distributed, only rank 0 calls it and broadcasts each
    part, so no process ever holds more than one part of the full weights (and only rank 0 needs
    to see the files). `partial`: the model holds only some of them (pipeline stages)."""
    import torch.distributed as dist

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank0 = not distributed or dist.get_rank() == 0
    chunks = iter(weight_chunks()) if rank0 else None
    names: set[str] = set()
    while True:
        chunk, failure = {}, None
        if rank0:
            try:
                chunk = next(chunks, None)
            except EmberError as err:  # every rank stops with it, none waits for a part that never comes
                if not distributed:
                    raise
                failure = str(err)
        if distributed:  # rank 0 says whether a part follows, or why none will
            news = [failure if failure is not None else chunk is not None]
            dist.broadcast_object_list(news, src=0)
            if isinstance(news[0], str):
                raise EmberError(news[0])
            if not news[0]:
                break
            load_full_weights(model, chunk, from_rank0=True)
        elif chunk is None:
            break
        else:
            _, unexpected = model.load_state_dict(chunk, strict=False)
            if unexpected and not partial:
                raise EmberError(f"the weights do not fit the model: unexpected {unexpected[:3]}")
        names.update(chunk)
    if distributed:  # every rank checks what it holds against rank 0's names
        shared = [names]
        dist.broadcast_object_list(shared, src=0)
        names = shared[0]
    model_names = {name.replace("._checkpoint_wrapped_module", "") for name in model.state_dict()}
    missing = sorted(model_names - names)
    extra = [] if partial else sorted(names - model_names)
    if missing or extra:
        raise EmberError(f"the weights do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
