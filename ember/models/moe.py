"""Mixture-of-experts block (Mixtral, Grok-1): top-k router, experts stored as stacked
[num_experts, ...] weights, optional shared experts and a Switch-style load-balancing loss.

Dispatch sorts the (token, expert) assignments by expert so each expert runs one matmul over a
contiguous slice; there is no loop over tokens. No distribution code lives here; parallel code
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

    Called as `experts(grouped, counts)`: rows of `grouped` [sum(counts), dim] sorted by expert,
    counts[e] of them for expert e; returns their outputs in the same order.

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

    def forward(self, grouped: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outputs, start = [], 0
        for weights, count in zip(self.per_expert(), counts, strict=True):
            # Empty slices still run: every expert weight stays in the graph, so its gradient is
            # a zero tensor rather than None when no token picked it.
            outputs.append(self.expert_forward(weights, grouped[start : start + count]))
            start += count
        return torch.cat(outputs)


class LocalDispatch:
    """The default `MoE.dispatcher`: every expert runs in this process.

    A dispatcher is called as `dispatcher(moe, tokens, experts, weights)` with tokens [N, dim],
    experts [N, k] (expert ids), weights [N, k] (their router weights), and returns the combined
    output [N, dim]: sum over k of weight * expert(token), assignments past capacity left out."""

    def __call__(self, moe: MoE, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        order, counts = moe.sort_assignments(experts)
        token_of = order // moe.top_k
        expert_out = moe.experts(tokens[token_of], counts.tolist())
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
        self.input_jitter = args.moe_input_jitter
        self.router = nn.Linear(args.dim, args.num_experts, bias=False)
        self.experts = GroupedExperts(args)
        shared = args.num_shared_experts * args.moe_ffn_dim
        self.shared_experts = FeedForward(args, shared) if args.num_shared_experts else None
        self.dispatcher: Callable[[MoE, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = LocalDispatch()
        self.balance_scope = LoadBalanceScope()
        # Load-balancing loss of the last forward (already times the coefficient), or None.
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

        out = self.dispatcher(self, tokens, experts, weights.to(tokens.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        return out.reshape(shape)

    def capacity(self, num_tokens: int) -> int | None:
        """Most assignments an expert takes from `num_tokens` tokens; None: dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def sort_assignments(self, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, counts) for experts [N, k]: indices into the flattened assignments, sorted by
        expert (stably, so capacity keeps an expert's first assignments in token order) with those
        past capacity left out, and the [num_experts] count each expert keeps."""
        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        capacity = self.capacity(experts.shape[0])
        if capacity is not None:
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(order.numel(), device=order.device) - starts[flat_experts[order]]
            order = order[position < capacity]
            counts = counts.clamp(max=capacity)
        return order, counts

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
