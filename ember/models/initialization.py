"""The run's random initialisation, one part of the model at a time.

`Transformer.init_weights(seed)` fills a whole model at once; a trainer that shards the model
needs the same values without ever holding the whole model in one process, so
`initial_weight_chunks` makes them part by part (embeddings, each layer, the final norm, the
output layer) on the CPU, and `ember.checkpoint.initialize` loads and broadcasts each part.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ember.errors import EmberError
from ember.models.args import ModelArgs
from ember.models.transformer import Transformer


def initial_weight_chunks(args: ModelArgs, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The run's random initialisation, one part of the model at a time (the embeddings, each
    layer, the final norm, the output layer), made on the CPU so it is the same for every layout.

    The values are `Transformer.init_weights(seed)`'s, drawn in the same order, but only one part
    is ever in memory: a 70B model does not need 280 GB of host memory on rank 0 to start.
    """
    with torch.device("meta"):
        reference = Transformer(args)
    parts: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in reference.named_modules():
        if reference.initialises(name, module):
            top = name.split(".")[0]
            parts.setdefault(f"layers.{name.split('.')[1]}" if top == "layers" else top, []).append((name, module))
    expected = set(reference.state_dict())
    seen: set[str] = set()
    generator = torch.Generator().manual_seed(seed)  # private: the global RNG is left alone
    for modules in parts.values():
        chunk: dict[str, torch.Tensor] = {}
        for name, module in modules:
            module.to_empty(device="cpu", recurse=False)
            reference.init_module(name, module, generator)
            for param_name, param in module.named_parameters(recurse=False):
                chunk[f"{name}.{param_name}" if name else param_name] = param.detach()
        if args.tie_embeddings and "tok_embeddings.weight" in chunk:
            chunk["output.weight"] = chunk["tok_embeddings.weight"]  # one matrix, both names
        seen.update(chunk)
        yield chunk
        for _, module in modules:  # give the memory back before the next part
            module.to_empty(device="meta", recurse=False)
    if seen != expected:
        raise EmberError(f"initialisation left out {sorted(expected - seen)[:3]}; this is a bug in ember")
