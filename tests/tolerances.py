"""How close two fp32 computations of the same mathematics must be: the one rule the parity tests
(ember against transformers / megatron-core, against a per-token loop, against a single-process
run) compare with, instead of a hand-picked 1e-5 each.

Two correct implementations differ only in the order of their floating-point additions: another
kernel (MKL or ATen, AVX2 or AVX-512), another number of threads (each sums its own block, then the
blocks are added), another blocking of a matmul, a sum split over ranks. Each fp32 addition rounds
by at most eps/2 relative (eps = 2**-23, about 1.19e-7). Rounding errors of a sum of K terms add up
like a random walk, so its error is about eps * sqrt(K) times the typical size of the result
(the worst case grows with K, but needs every rounding to go the same way). For a value that went
through several reductions one after the other (a matmul, a softmax, another matmul), K is the
sum of their lengths: the errors of the stages add up the same way.

So two correct results agree within

    rtol = SAFETY * eps * sqrt(K)
    atol = SAFETY * eps * sqrt(K) * scale,   scale = root mean square of the expected values

A pure rtol is wrong: an element near zero got there by cancellation of terms of the usual size
and keeps their absolute error; a fixed atol fits only one scale (a 1e-5 atol is 1e-6 relative
on values of size 12, below what two thread counts give). SAFETY covers the tail of the error
distribution over a whole tensor and a little amplification through the layers: two results
rounded independently differ by sqrt(2) times one's error, and the largest of up to a million
normally distributed errors lies within 5 standard deviations, hence 8. Measured with K counted as
above (the MoE block against transformers' Mixtral block and against a per-token loop, nine
transformers models' logits, losses and gradients, with every ATEN_CPU_CAPABILITY and
MKL_ENABLE_INSTRUCTIONS kernel and 1 or 2 threads; TP2 / CP2 / EP2 against one process), the
largest error needed 1.2 (`measured_safety`); the MoE block's 1.14e-5 failure against the old
fixed 1e-5 (reported on another machine's kernels) needs at most 2.8.

A real bug is far outside: a wrong or transposed weight, rotary halves swapped, a missing bias,
a dropped token or a mis-routed expert change results by 1e-3 relative or (much) more, while
these bounds stay near 1e-5 relative for K in the hundreds (tests/test_models_moe.py and
tests/test_models_parity.py show that small deliberate errors fail them).
"""

from __future__ import annotations

import math

import torch

FP32_EPS = torch.finfo(torch.float32).eps
SAFETY = 8.0


def fp32_bound(terms: int) -> float:
    """The relative error allowed to a value made of `terms` fp32 additions (see the module doc)."""
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}")
    return SAFETY * FP32_EPS * math.sqrt(terms)


def rms(*tensors: torch.Tensor) -> float:
    """Root mean square over all the elements of `tensors`."""
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    return flat.square().mean().sqrt().item()


def fp32_tolerance(expected: torch.Tensor, terms: int, min_scale: float = 0.0) -> dict[str, float]:
    """rtol / atol for torch.testing.assert_close(actual, expected, **fp32_tolerance(expected, K)).

    `min_scale`: the size of the summands when the expected values are themselves a cancellation,
    rounding noise around zero. A key bias's gradient is one (zero in exact arithmetic: softmax
    ignores a shift of every score); its rms says nothing about its error, while the rms of the
    model's gradients does."""
    bound = fp32_bound(terms)
    return {"rtol": bound, "atol": bound * max(rms(expected), min_scale)}


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, *, terms: int, min_scale: float = 0.0,
                      msg=None) -> None:
    """assert_close with the tolerance two fp32 reduction orders justify (`terms` = K above)."""
    torch.testing.assert_close(actual, expected, **fp32_tolerance(expected, terms, min_scale), msg=msg)


def measured_safety(actual: torch.Tensor, expected: torch.Tensor, terms: int, min_scale: float = 0.0) -> float:
    """The SAFETY that comparing these two would need: max |a - b| / (eps sqrt(K) (scale + |b|)).
    For calibration and for failure messages; below SAFETY means assert_fp32_close passes."""
    scale = max(rms(expected), min_scale)
    expected = expected.detach().double()
    unit = FP32_EPS * math.sqrt(terms) * (scale + expected.abs())
    return ((actual.detach().double() - expected).abs() / unit).max().item()


def forward_terms(args, seq_len: int) -> int:
    """K for the logits of a Transformer forward pass: the reductions one value goes through, per
    layer (norm, q/k/v projection, q.k over head_dim, softmax and weighted sum over the keys,
    output projection, norm, MLP in and out, the top-k sum of an MoE), then the final norm and
    output projection."""
    ffn = args.moe_ffn_dim + args.moe_top_k if args.num_experts else args.ffn_dim
    per_layer = 4 * args.dim + args.head_dim + seq_len + args.n_heads * args.head_dim + ffn
    return args.n_layers * per_layer + 2 * args.dim


def loss_terms(args, seq_len: int, tokens: int) -> int:
    """K for a cross-entropy over `tokens` tokens: the logits', the log-sum-exp over the vocabulary,
    the sum over the tokens."""
    return forward_terms(args, seq_len) + args.vocab_size + tokens


def backward_terms(forward: int, tokens: int) -> int:
    """K for a gradient: the forward's errors, the same chain again backwards, and a weight's
    gradient summed over the tokens."""
    return 2 * forward + tokens
