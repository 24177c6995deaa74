"""The language-model loss: token cross-entropy summed over the loss mask, in fp32.

Works on whole logits (a plain tensor, or a replicated DTensor) and on logits sharded over the
vocabulary by tensor parallelism (a DTensor with `Shard(-1)`, what `apply_tensor_parallel(...,
loss_parallel=True)` returns). The sharded case never gathers the logits: each rank reduces its
slice of the vocabulary and two small all-reduces (max, then sum-exp and target logit) finish the
softmax, as Megatron's vocab-parallel cross-entropy does. Its backward pass needs no
communication and no context manager (torch's `loss_parallel()` must also wrap `backward()`,
which the trainer and the pipeline schedules do not do), so it composes with any caller.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token losses (fp32, plain tensor shaped like `labels`) for logits [..., vocab].

    Labels outside the vocabulary (e.g. -100 on padding) give meaningless losses instead of an
    error; the loss mask must exclude them."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not loaded: logits cannot be a DTensor
    if dtensor is not None and isinstance(logits, dtensor.DTensor):
        last = logits.ndim - 1
        placements = logits.placements
        if len(placements) == 1 and placements[0].is_shard() and placements[0].dim in (-1, last):
            local = logits.to_local().float()
            local = local.reshape(-1, local.shape[-1])
            start = logits.device_mesh.get_local_rank() * local.shape[-1]
            losses = _VocabParallelCrossEntropy.apply(local, labels.reshape(-1), start,
                                                      logits.device_mesh.get_group())
            return losses.view(labels.shape)
        logits = logits.full_tensor()
    flat = logits.float().reshape(-1, logits.shape[-1])
    targets = labels.reshape(-1)
    in_vocab = (targets >= 0) & (targets < flat.shape[-1])
    losses = F.cross_entropy(flat, torch.where(in_vocab, targets, 0), reduction="none")
    return losses.view(labels.shape)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                      loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of token losses where `loss_mask` is non-zero (all tokens when None): a 0-dim fp32
    tensor, the same on every tensor-parallel rank. Divide by the global count of loss tokens."""
    losses = token_cross_entropy(logits, labels)
    if loss_mask is None:
        return losses.sum()
    return (losses * loss_mask.to(losses.dtype)).sum()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits split over the vocabulary across `group`'s ranks.

    local_logits: fp32 [N, V/tp], this rank's vocabulary slice [start, start + V/tp)."""

    @staticmethod
    def forward(ctx, local_logits: torch.Tensor, targets: torch.Tensor, start: int, group) -> torch.Tensor:
        width = local_logits.shape[-1]
        # the global max keeps exp() in range; it cancels out of the loss, so no gradient flows through it
        row_max = local_logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = local_logits - row_max[:, None]
        exp = shifted.exp()
        here = (targets >= start) & (targets < start + width)
        local_targets = torch.where(here, targets - start, 0)
        target_logit = shifted.gather(1, local_targets[:, None]).squeeze(1) * here
        sums = torch.stack([exp.sum(dim=-1), target_logit])
        dist.all_reduce(sums, group=group)  # sum-exp and the target's logit, in one call
        sum_exp, target_logit = sums
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), local_targets, here)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_targets, here = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(target), restricted to this rank's slice
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_targets] -= here.to(grad.dtype)
        return grad * grad_loss[:, None], None, None, None
