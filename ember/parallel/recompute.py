"""Activation recomputation (gradient checkpointing) of transformer blocks.

- full: a block keeps only its input; everything inside is recomputed in backward.
  `--recompute-method block --recompute-num-layers N` does this for the first N blocks only;
  `uniform` does it for every block.
- selective: a block keeps the outputs of its expensive ops (matmuls, attention) and recomputes the
  cheap, memory-hungry ones (norms, activations, rotary, softmax inputs) — the spirit of Megatron's
  selective recomputation, expressed as an op-level policy.

Blocks are replaced by `checkpoint_wrapper`s, whose state-dict hooks keep parameter names unchanged,
so checkpoints do not depend on recomputation settings.

Dropout: the recomputed forward must drop exactly what the forward dropped. torch's checkpoint
restores the default RNG states (CPU, and the inputs' GPU) a block saw in its forward
(`preserve_rng_state`); the per-rank dropout streams of tensor, sequence and context parallelism
(`ember.parallel.rng`) are derived from those states by hooks inside the block or around the
whole model, so they replay too; unlike Megatron's CheckpointFunction there is no tracker state to
save beside them. Under torch.compile, a block with a graph break inside (the dropout streams'
hooks are one) is recomputed through separately compiled pieces, whose inductor-generated random
ops do not replay; `_replay_compiled_dropout` makes inductor use the eager random ops, which do.
"""

from __future__ import annotations

import torch
from torch import nn

# Ops whose outputs selective recomputation keeps: recomputing them would cost real FLOPs.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


def blocks_to_recompute(num_layers: int, method: str | None, num_recompute: int | None) -> list[int]:
    if method == "block":
        return list(range(min(num_recompute or 0, num_layers)))
    return list(range(num_layers))


def _replay_compiled_dropout(model: nn.Module) -> None:
    """With dropout on, have compiled blocks draw with torch's own random ops (a process-wide
    inductor setting): measured on tiny-llama with dropout, recomputed gradients then equal the
    plain ones to 1e-9 (float reordering) instead of differing by 2e-3 (other masks)."""
    args = getattr(model, "args", None)
    if args is not None and (args.hidden_dropout > 0 or args.attention_dropout > 0):
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True


def apply_recompute(model: nn.Module, granularity: str | None, method: str | None = None,
                    num_layers: int | None = None) -> None:
    """Wrap the blocks in `model.layers` (an nn.ModuleDict) in place."""
    if granularity is None:
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    _replay_compiled_dropout(model)
    keys = list(model.layers.keys())
    chosen = blocks_to_recompute(len(keys), method, num_layers) if granularity == "full" else range(len(keys))
    for index in chosen:
        key = keys[index]
        if granularity == "full":
            wrapped = checkpoint_wrapper(model.layers[key], preserve_rng_state=True)
        else:
            wrapped = checkpoint_wrapper(model.layers[key], preserve_rng_state=True, context_fn=_selective_context)
        model.layers[key] = wrapped

