"""Mixture-of-experts block (Mixtral, Grok-1): top-k router, experts stored as stacked
[num_experts, ...] weights, optional shared experts and a Switch-style load-balancing loss.

Dispatch sorts the (token, expert) assignments by expert so each expert runs one matmul over a
contiguous slice; there is no loop over tokens. No distribution code lives here: expert
parallelism shards `experts` from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.args import ModelArgs
from ember.models.feed_forward import FeedForward, activation_fn


class GroupedExperts(nn.Module):
    """num_experts MLPs in three stacked tensors: w1/w3 [E, ffn, dim], w2 [E, dim, ffn]
    (nn.Linear's [out, in] orientation per expert, like Hugging Face's per-expert weights)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        experts, dim, hidden = args.num_experts, args.dim, args.moe_ffn_dim
        self.w1 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(experts, hidden, dim)) if args.mlp_type == "gated" else None
        self.act = activation_fn(args.activation)

    def per_expert(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(w1, w2, w3) views per expert. unbind once per forward: indexing w[e] per expert
        would make backward allocate a full [E, ...] gradient for every expert."""
        w3s = self.w3.unbind(0) if self.w3 is not None else [None] * self.w1.shape[0]
        return list(zip(self.w1.unbind(0), self.w2.unbind(0), w3s))

    def expert_forward(self, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], x: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = weights
        hidden = self.act(F.linear(x, w1))
        if w3 is not None:
            hidden = hidden * F.linear(x, w3)
        return F.linear(hidden, w2)


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
        self.aux_loss = self._load_balancing_loss(scores, experts) if self.aux_loss_coef > 0 else None

        out = self._dispatch(tokens, experts, weights.to(tokens.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        return out.reshape(shape)

    def _dispatch(self, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        capacity = self._capacity(tokens.shape[0])
        gathered = tokens[token_of]
        gathered_weights = weights.reshape(-1)[order]
        outputs, kept = [], []
        start = 0
        for weights, count in zip(self.experts.per_expert(), counts):
            take = count if capacity is None else min(count, capacity)
            if take:
                outputs.append(self.experts.expert_forward(weights, gathered[start : start + take]))
                kept.append(torch.arange(start, start + take, device=tokens.device))
            start += count
        out = torch.zeros_like(tokens)
        if not outputs:
            return out
        expert_out = torch.cat(outputs)
        if capacity is not None:
            rows = torch.cat(kept)
            token_of, gathered_weights = token_of[rows], gathered_weights[rows]
        return out.index_add_(0, token_of, expert_out * gathered_weights[:, None])

    def _capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def _load_balancing_loss(self, scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Switch-Transformer loss in Megatron's normalisation (uniform routing gives coef):
        E / (k * T^2) * sum_e (tokens routed to e) * (sum of router probabilities for e)."""
        probs = scores if self.gating == "softmax" else scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        num_tokens = scores.shape[0]
        tokens_per_expert = torch.bincount(experts.reshape(-1), minlength=self.num_experts).to(probs.dtype)
        balance = torch.sum(probs.sum(dim=0) * tokens_per_expert)
        return balance * (self.num_experts * self.aux_loss_coef / (self.top_k * num_tokens * num_tokens))
