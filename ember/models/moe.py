"""Mixture-of-experts block (Mixtral, Grok-1): top-k router, experts stored as stacked
[num_experts, ...] weights, optional shared experts and a Switch-style load-balancing loss.

Dispatch sorts the (token, expert) assignments by expert so the experts' rows are contiguous
slices, then runs all experts at once with one grouped GEMM (`torch.nn.functional.grouped_mm`,
offsets a device tensor) where torch supports it for the tensors at hand, else one matmul per
expert; the local path never reads expert counts on the host (no device sync per block).
Capacity (`moe_capacity_factor`) keeps shapes static too: assignments over capacity are sorted
after the kept ones and masked out, chosen by Megatron's drop policies (`moe_drop_policy`). No distribution code lives here; parallel code
changes the block only through three public extension points (as torchtitan's parallel styles
do), each with a local default:
- `MoE.dispatcher`: how assignments reach the experts and come back (`LocalDispatch`; expert
  parallelism installs an all-to-all one);
- `GroupedExperts.local_weight` and the module's forward hooks: which tensors the experts multiply
  by, and what happens around their computation (tensor parallelism: this rank's slice of the
  ffn dim, the partial outputs summed over its ranks);
- `MoE.balance_scope`: which tokens the load-balancing loss balances (`LoadBalanceScope`, the
  block's own input; context parallelism sums the token counts over the pieces of a sequence).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.args import ModelArgs
from ember.models.feed_forward import FeedForward, activation_fn

ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _as_is(weight: torch.Tensor) -> torch.Tensor:
    return weight


class GroupedExperts(nn.Module):
    """num_experts MLPs in three stacked tensors: w1/w3 [E, ffn, dim], w2 [E, dim, ffn]
    (nn.Linear's [out, in] orientation per expert, like Hugging Face's per-expert weights).

    Called as `experts(grouped, counts)`: rows of `grouped` [M, dim] sorted by expert, counts[e]
    (a [E] device tensor) of them for expert e, rows past sum(counts) padding; returns their
    outputs in the same order (zeros for padding). One grouped GEMM per weight where
    `prefer_grouped_mm` (or `use_grouped_mm`) says so, else one matmul per expert.

    `local_weight`: maps each stacked parameter to the plain tensor the experts multiply by; the
    identity unless parallel code made the parameters DTensors, when it sets it to take this
    rank's part (gradients flow back into the sharded parameter). Parallel code that must act
    around the computation (tensor parallelism's f and g operators) registers forward hooks."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        experts, dim, hidden = args.num_experts, args.dim, args.moe_ffn_dim
        self.w1 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(experts, hidden, dim)) if args.mlp_type == "gated" else None
        self.act = activation_fn(args.activation)
        self.local_weight: Callable[[torch.Tensor], torch.Tensor] = _as_is

    # None: `prefer_grouped_mm` decides per call; True / False force one path (tests, benchmarks).
    use_grouped_mm: bool | None = None

    def per_expert(self) -> list[ExpertWeights]:
        """(w1, w2, w3) views per expert this rank holds. unbind once per forward: indexing w[e]
        per expert would make backward allocate a full [E, ...] gradient for every expert."""
        w1, w2 = self.local_weight(self.w1), self.local_weight(self.w2)
        w3s = self.local_weight(self.w3).unbind(0) if self.w3 is not None else [None] * w1.shape[0]
        return list(zip(w1.unbind(0), w2.unbind(0), w3s))

    def expert_forward(self, weights: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = weights
        hidden = self.act(F.linear(x, w1))
        if w3 is not None:
            hidden = hidden * F.linear(x, w3)
        return F.linear(hidden, w2)

    def forward(self, grouped: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """grouped [M, dim], rows sorted by expert; counts [E] (a tensor, on grouped's device):
        expert e takes counts[e] rows. Rows past sum(counts) are padding (dropped assignments):
        their outputs are zero and no gradient flows through them."""
        w1 = self.local_weight(self.w1)
        use_grouped = self.use_grouped_mm
        if use_grouped is None:
            use_grouped = prefer_grouped_mm(grouped, w1)
        return self._grouped_forward(grouped, counts, w1) if use_grouped else self._looped_forward(grouped, counts)

    def _grouped_forward(self, grouped: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
        ends = torch.cumsum(counts, 0).to(torch.int32)
        # grouped_mm leaves rows past ends[-1] unwritten (garbage): mask them on the way in (so
        # no gradient reaches the input through them) and on the way out.
        valid = (torch.arange(grouped.shape[0], device=grouped.device) < ends[-1])[:, None]
        x = torch.where(valid, grouped, 0)
        hidden = self.act(_grouped_linear(x, w1, ends))
        if self.w3 is not None:
            hidden = hidden * _grouped_linear(x, self.local_weight(self.w3), ends)
        out = _grouped_linear(hidden, self.local_weight(self.w2), ends)
        return torch.where(valid, out, 0)

    def _looped_forward(self, grouped: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One matmul per expert: needs the counts on the host (a device sync)."""
        outputs, start = [], 0
        for weights, count in zip(self.per_expert(), counts.tolist(), strict=True):
            # Empty slices still run: every expert weight stays in the graph, so its gradient is
            # a zero tensor rather than None when no token picked it.
            outputs.append(self.expert_forward(weights, grouped[start : start + count]))
            start += count
        outputs.append(grouped.new_zeros(grouped.shape[0] - start, outputs[-1].shape[1]))
        return torch.cat(outputs)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward
    (torch 2.13) rejects an expanded gradient such as the one `.sum()` gives."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per expert e, F.linear(x[ends[e-1]:ends[e]], weight[e]) for weight [E, out, in], in one call."""
    return _ContiguousGrad.apply(_grouped_mm(x, weight.transpose(-2, -1), offs=ends))


_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# What torch 2.13's grouped_mm accepts: on CPU fp32 / bf16 / fp16 (not fp64); on CUDA bf16 on
# compute capability >= 8.0, every row stride 16-byte aligned.
_GROUPED_MM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def prefer_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The experts' default path: one grouped GEMM on an accelerator that supports it, where the
    loop's host read of the counts would stall the device every block. On CPU the loop: reading
    counts costs nothing there, and torch 2.13's CPU grouped_mm measured 4-12% slower than
    per-expert matmuls (fp32, forward + backward, 1 thread; issue 18)."""
    return x.device.type != "cpu" and grouped_mm_supported(x, weight)


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether one grouped GEMM can run the experts for input x and a stacked weight [E, out, in]."""
    if _grouped_mm is None or x.dtype != weight.dtype or x.device != weight.device:
        return False
    if x.device.type == "cpu":
        return x.dtype in _GROUPED_MM_CPU_DTYPES
    if x.device.type == "cuda":
        aligned = all(size * x.element_size() % 16 == 0 for size in weight.shape[1:])
        return x.dtype == torch.bfloat16 and aligned and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


class LocalDispatch:
    """The default `MoE.dispatcher`: every expert runs in this process.

    A dispatcher is called as `dispatcher(moe, tokens, experts, weights)` with tokens [N, dim],
    experts [N, k] (expert ids), weights [N, k] (their router weights), and returns the combined
    output [N, dim]: sum over k of weight * expert(token), assignments past capacity left out."""

    def __call__(self, moe: MoE, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        order, counts = moe.sort_assignments(experts, weights)
        token_of = order // moe.top_k
        # Dropped assignments (past sum(counts)) come back as zeros: index_add adds nothing.
        expert_out = moe.experts(tokens[token_of], counts)
        combined = expert_out * weights.reshape(-1)[order][:, None]
        return torch.zeros_like(tokens).index_add_(0, token_of, combined)


class LoadBalanceScope:
    """The default `MoE.balance_scope`: the load-balancing loss balances the block's own input.

    `pieces`: how many processes hold pieces of the same sequences; `sum_counts` adds up their
    per-expert token counts (a [num_experts] tensor). Context parallelism overrides both."""

    pieces = 1

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return counts


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_experts = args.num_experts
        self.top_k = args.moe_top_k
        self.gating = args.moe_gating
        self.renormalize = args.moe_renormalize
        self.aux_loss_coef = args.moe_aux_loss_coef
        self.capacity_factor = args.moe_capacity_factor
        self.drop_policy = args.moe_drop_policy
        self.z_loss_coef = args.moe_z_loss_coef
        self.input_jitter = args.moe_input_jitter
        self.router = nn.Linear(args.dim, args.num_experts, bias=False)
        self.experts = GroupedExperts(args)
        shared = args.num_shared_experts * args.moe_ffn_dim
        self.shared_experts = FeedForward(args, shared) if args.num_shared_experts else None
        self.dispatcher: Callable[[MoE, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = LocalDispatch()
        self.balance_scope = LoadBalanceScope()
        # Load-balancing loss plus router z-loss of the last forward (each already times its
        # coefficient), or None when both coefficients are 0.
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        router_in = tokens
        if self.training and self.input_jitter > 0:
            noise = torch.empty_like(tokens).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
            router_in = tokens * noise
        # Routing in fp32 (as HF Mixtral and Megatron's router do) so bf16 does not flip top-k.
        logits = self.router(router_in).float()
        scores = logits.softmax(dim=-1) if self.gating == "softmax" else logits.sigmoid()
        weights, experts = torch.topk(scores, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.aux_loss = self.load_balancing_loss(scores, experts) if self.aux_loss_coef > 0 else None
        if self.z_loss_coef > 0:
            z_loss = self.router_z_loss(logits)
            self.aux_loss = z_loss if self.aux_loss is None else self.aux_loss + z_loss

        out = self.dispatcher(self, tokens, experts, weights.to(tokens.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        return out.reshape(shape)

    def capacity(self, num_tokens: int) -> int | None:
        """Most assignments an expert takes from `num_tokens` tokens; None: dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def sort_assignments(self, experts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, counts) for experts [N, k] and their router weights [N, k]: `order` is a
        permutation of the N*k flattened assignments, the kept ones first, sorted by expert
        (stably: in token order within an expert), the ones past capacity after them; counts
        [num_experts] is how many each expert keeps. Everything stays on the device: no sync.

        Over capacity, Megatron's drop policies choose who stays: "probs" keeps an expert's
        `capacity` assignments of highest router weight, "position" its first ones in token order."""
        flat_experts = experts.reshape(-1)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=experts.device)
        counts.scatter_add_(0, flat_experts, torch.ones_like(flat_experts))  # bincount syncs on CUDA
        capacity = self.capacity(experts.shape[0])
        if capacity is None or capacity >= experts.shape[0]:  # Megatron: nothing to drop
            return torch.argsort(flat_experts, stable=True), counts
        if self.drop_policy == "probs":  # by expert, highest weight first within an expert
            by_weight = torch.argsort(weights.reshape(-1).detach(), descending=True, stable=True)
            ranked = by_weight[torch.argsort(flat_experts[by_weight], stable=True)]
        else:
            ranked = torch.argsort(flat_experts, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(ranked.numel(), device=ranked.device) - starts[flat_experts[ranked]]
        dropped = rank_in_expert >= capacity
        # Kept assignments by expert, in token order within one (ranked holds the flattened
        # index token * k + slot); the dropped ones last.
        key = torch.where(dropped, self.num_experts, flat_experts[ranked]) * ranked.numel() + ranked
        kept_first = ranked[torch.argsort(key)]
        return kept_first, counts.clamp(max=capacity)

    def router_z_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """ST-MoE router z-loss as Megatron's z_loss_func: coef * mean over tokens of
        logsumexp(logits)^2 (keeps the router's logits small)."""
        return torch.logsumexp(logits, dim=-1).square().mean() * self.z_loss_coef

    def load_balancing_loss(self, scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Switch-Transformer loss in Megatron's normalisation (uniform routing gives coef):
        E / (k * T^2) * sum_e (tokens routed to e) * (sum of router probabilities for e), over the
        T tokens of `balance_scope`; this block's share, times its number of pieces p, so that
        averaging the p shares' gradients gives the loss of the whole sequences."""
        probs = scores if self.gating == "softmax" else scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        pieces = self.balance_scope.pieces
        num_tokens = scores.shape[0] * pieces
        tokens_per_expert = torch.bincount(experts.reshape(-1), minlength=self.num_experts).to(probs.dtype)
        tokens_per_expert = self.balance_scope.sum_counts(tokens_per_expert)
        balance = torch.sum(probs.sum(dim=0) * tokens_per_expert)
        return balance * (self.num_experts * self.aux_loss_coef * pieces / (self.top_k * num_tokens * num_tokens))
