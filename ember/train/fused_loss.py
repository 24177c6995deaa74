"""The language-model loss fused with the output layer: summed token cross-entropy computed from
the final hidden states and the output weight, a block of tokens at a time.

The plain path (`model(tokens)` then `cross_entropy_sum`) writes the whole [tokens, vocab] fp32
logits, its log-softmax, a one-hot gradient buffer and the logits' gradient: four passes over the
largest tensor of the step (262 MB for 2048 tokens x 32000 words), plus their allocations. Here
each block of `chunk_rows` tokens makes its logits, turns them in place into their gradient
(softmax - one-hot) and feeds that straight into the two gradient matmuls, so the block is still
in cache, and the full logits never exist. The same matmuls run as in the plain path; only the
element-wise work and the memory traffic go (the approach of Liger-Kernel's fused linear
cross-entropy). Gradients are produced during the forward pass, which is why it pays only in
training, where backward always follows; backward then just scales them by the incoming gradient.

`lm_loss_sum(model, tokens, labels, loss_mask)` is the training loss of an ember Transformer: the
model hands its final hidden states and output layer to the fused loss inside its forward (where
FSDP has the output weight gathered, so data parallelism in every mode takes the fused path);
tensor parallelism (vocabulary-sharded logits), pipeline stages and other models take the plain
path.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ember.parallel.loss import cross_entropy_sum


def default_chunk_rows(device: torch.device, vocab_size: int) -> int:
    """Tokens per block. CPU: about 256 rows per thread, so each thread's share of the logits
    block stays in its caches while the weight-gradient accumulation, a [vocab, dim]
    read-modify-write per block, is paid rarely enough (measured on 56M and 2.4M Llama shapes with
    1 and 2 threads, see benchmarks/RESULTS.md), and no more than 256 MiB of fp32 logits. GPU:
    blocks of up to 1 GiB of fp32 logits, so each matmul is large."""
    if device.type == "cpu":
        return max(128, min(256 * torch.get_num_threads(), (256 << 20) // (4 * vocab_size)))
    return max(256, (1 << 30) // (4 * vocab_size))


def _is_dtensor(tensor: torch.Tensor) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: nothing can be a DTensor
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits_t: torch.Tensor, hidden: torch.Tensor,
                            first: bool) -> None:
    """grad_weight (fp32) += grad_logits^T @ hidden, or = for the first block."""
    if grad_logits_t.dtype != torch.float32:  # bf16/fp16 products, summed over blocks in fp32
        block = torch.mm(grad_logits_t, hidden)
        if first:
            grad_weight.copy_(block)
        else:
            grad_weight.add_(block)
    elif first:
        torch.mm(grad_logits_t, hidden, out=grad_weight)
    else:
        grad_weight.addmm_(grad_logits_t, hidden)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i token_weight_i * CE(hidden_i @ weight^T, label_i), gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                token_weights: torch.Tensor, chunk_rows: int, compute_dtype: torch.dtype,
                need_grad: bool) -> torch.Tensor:
        rows, vocab = hidden.shape[0], weight.shape[0]
        device = hidden.device
        low_precision = compute_dtype != torch.float32
        need_hidden_grad = need_grad and ctx.needs_input_grad[0]
        need_weight_grad = need_grad and ctx.needs_input_grad[1]
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        chunk_rows = max(1, min(chunk_rows, rows))
        # in place on the CPU (no second block in cache); elsewhere out of place, since the caching
        # allocator makes that free and accelerator kernels need not support aliasing
        in_place = device.type == "cpu"
        logits_buffer = torch.empty(chunk_rows, vocab, dtype=compute_dtype, device=device)
        # the softmax runs in fp32 whatever the matmul dtype, as in the plain path
        fp32_buffer = torch.empty(chunk_rows, vocab, device=device) if low_precision else logits_buffer
        targets = labels[:, None]
        picked = torch.empty(rows, 1, device=device)  # log p(label) of every token
        minus_one = torch.full((chunk_rows, 1), -1.0, device=device)
        grad_hidden = torch.empty(hidden.shape, dtype=compute_dtype, device=device) if need_hidden_grad else None
        # filled by the first block's matmul (no zero-fill pass over [vocab, dim])
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=device) if need_weight_grad else None
        # token weights scale rows of [rows, dim] tensors, once, instead of every [rows, vocab] block
        weighted_h = h * token_weights[:, None].to(compute_dtype) if need_weight_grad else None
        for start in range(0, rows, chunk_rows):
            end = min(rows, start + chunk_rows)
            logits = torch.mm(h[start:end], w.t(), out=logits_buffer[: end - start])
            log_probs = fp32_buffer[: end - start]
            if low_precision:
                log_probs.copy_(logits)
            log_probs = torch.log_softmax(log_probs, -1, out=log_probs) if in_place else log_probs.log_softmax(-1)
            torch.gather(log_probs, 1, targets[start:end], out=picked[start:end])
            if not (need_hidden_grad or need_weight_grad):
                continue
            # d CE / d logits = softmax - one_hot(label), made in place over the block
            grad_logits = log_probs.exp_().scatter_add_(1, targets[start:end], minus_one[: end - start])
            if low_precision:
                grad_logits = grad_logits.to(compute_dtype)
            if need_hidden_grad:
                torch.mm(grad_logits, w, out=grad_hidden[start:end])
            if need_weight_grad:
                _accumulate_weight_grad(grad_weight, grad_logits.t(), weighted_h[start:end], first=start == 0)
        if need_hidden_grad:
            grad_hidden = grad_hidden.float().mul_(token_weights[:, None])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.used = False
        return -torch.dot(picked.view(-1), token_weights)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.used:
            raise RuntimeError("the fused linear cross-entropy supports one backward pass per forward "
                               "(its gradients are scaled in place)")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        # in place: a fresh [vocab, dim] result would cost an allocation and its page faults
        grad_loss = grad_loss.to(torch.float32)
        grads = [None, None]
        if ctx.needs_input_grad[0]:
            grads[0] = grad_hidden.mul_(grad_loss).to(hidden_dtype)
        if ctx.needs_input_grad[1]:
            grads[1] = grad_weight.mul_(grad_loss).to(weight_dtype)
        return grads[0], grads[1], None, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             loss_mask: torch.Tensor | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Sum over tokens of loss_mask * CE(hidden @ weight^T, label), a 0-dim fp32 tensor: what
    `cross_entropy_sum(F.linear(hidden, weight), labels, loss_mask)` gives, without the logits.

    hidden [..., dim], weight [vocab, dim] (plain tensors), labels like hidden[..., 0]. Under
    autocast the matmuls run in the autocast dtype and the softmax in fp32, as they would in
    the plain path. Labels outside the vocabulary (-100 on padding) must be masked out."""
    dim = hidden.shape[-1]
    flat = hidden.reshape(-1, dim)
    targets = labels.reshape(-1)
    vocab = weight.shape[0]
    targets = torch.where((targets >= 0) & (targets < vocab), targets, 0)
    if loss_mask is None:
        token_weights = torch.ones(targets.shape, dtype=torch.float32, device=flat.device)
    else:
        token_weights = loss_mask.reshape(-1).to(torch.float32)
    device_type = flat.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    rows = chunk_rows or default_chunk_rows(flat.device, vocab)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(flat, weight, targets, token_weights, rows, compute_dtype, need_grad)


def fused_loss_applies(model: nn.Module) -> bool:
    """Whether `model` is an ember Transformer whose output layer the fused loss can take over:
    a bias-free nn.Linear that tensor parallelism has not split (its logits would be sharded;
    `apply_tensor_parallel` records its mesh as the model's `tensor_parallel_mesh`)."""
    from ember.models.transformer import Transformer

    if not isinstance(model, Transformer) or model.tensor_parallel_mesh is not None:
        return False
    output = model.output
    return model.tok_embeddings is not None and type(output) is nn.Linear and output.bias is None


def lm_loss_sum(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                chunk_rows: int | None = None, **model_kwargs) -> torch.Tensor:
    """The summed, masked token cross-entropy of `model` on one micro-batch (a 0-dim fp32 tensor),
    through the fused output layer where it applies. Call it inside the autocast context of the
    forward pass, as the plain `cross_entropy_sum(model(tokens), ...)` it replaces. `model_kwargs`
    (packed documents' `positions` / `documents`) go to the model's forward."""
    if not fused_loss_applies(model):
        return cross_entropy_sum(model(tokens, **model_kwargs), labels, loss_mask)

    def head(hidden: torch.Tensor, output: nn.Linear) -> torch.Tensor:
        # Runs inside the model's forward: FSDP has gathered the output weight, in every mode.
        if _is_dtensor(output.weight) or _is_dtensor(hidden):
            return cross_entropy_sum(output(hidden), labels, loss_mask)
        return linear_cross_entropy_sum(hidden, output.weight, labels, loss_mask, chunk_rows)

    return model(tokens, head=head, **model_kwargs)
