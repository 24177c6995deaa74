"""Context parallelism: one sequence cut into `cp` pieces, one per rank of the cp mesh.

Every rank runs the whole model on its piece of the sequence. Only attention looks across pieces:
each rank all-gathers the keys and values of the other pieces (the Llama-3 paper's "all-gather
KV" context parallelism) and attends with its local queries, masked by the tokens' global
positions. The all-gather runs through DTensor, so its backward pass is the matching
reduce-scatter of the key/value gradients; everything is plain torch ops and works on gloo.

With `load_balance` the sequence is cut into 2*cp chunks and rank r holds chunks r and 2*cp-1-r
(the "zigzag" layout of Megatron and torchtitan): under a causal mask every rank then has the
same amount of attention work, and attention only computes the key blocks each query chunk can
see.

Nothing here changes the model's code: attention modules get forward hooks that intercept
`F.scaled_dot_product_attention` inside them (a TorchFunctionMode), and the model gets a
pre-hook that passes each rank's global token positions to `Transformer.forward`, so RoPE and
learned positions are right on every piece and on every pipeline stage. How the sequence is cut
is recorded as the model's `ember_sequence_layout` (read it with `sequence_layout`).

Packed documents (Megatron's --reset-attention-mask): the document ids are sharded like the tokens;
each rank gathers the ids of the whole sequence once per forward, and every chunk's mask is built
from global positions, so a document split across ranks keeps its whole causal context.

The caller shards the batch with `shard_sequence` (input ids, labels, loss mask alike) and sums
the loss and the gradients over the cp ranks as it does over data-parallel ranks. ALiBi and
soft-capped attention (which do not go through SDPA's plain causal form) are refused.

An MoE block's load-balancing loss is made exact through its public `balance_scope`: each rank's
share uses the expert token counts summed over the cp ranks and the whole sequences' token count,
as Megatron does, and is multiplied by cp so that averaging gradients over the cp ranks (FSDP)
gives the sum of the shares — the single-process loss of the whole sequences.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ember.config.layout import check_context_parallel, check_sequence_split
from ember.errors import EmberError
from ember.models.moe import LoadBalanceScope
from ember.models.positions import AttentionMask


@dataclass(frozen=True)
class SequenceLayout:
    """How the sequence a model sees is cut across ranks.

    sp_degree: with sequence parallelism the hidden states between blocks hold 1/sp_degree of the
    (context-local) sequence, so a pipeline stage that receives hidden states sees fewer tokens
    than it attends over.
    """

    sp_degree: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    load_balance: bool = False


_LAYOUT_ATTR = "ember_sequence_layout"


def sequence_layout(model: nn.Module) -> SequenceLayout:
    return getattr(model, _LAYOUT_ATTR, SequenceLayout())


def set_sequence_layout(model: nn.Module, **changes) -> SequenceLayout:
    """Record how `model`'s sequence is cut; the first record installs its positions hook."""
    if not hasattr(model, _LAYOUT_ATTR):
        model.register_forward_pre_hook(_fill_positions, with_kwargs=True)
    layout = dataclasses.replace(sequence_layout(model), **changes)
    setattr(model, _LAYOUT_ATTR, layout)
    return layout


# --------------------------------------------------------------------------------- positions


def _chunk_ranges(seq_len: int, rank: int, size: int, load_balance: bool) -> list[tuple[int, int]]:
    """The [start, end) ranges of the global sequence rank `rank` holds, in its local order."""
    if not load_balance:
        piece = seq_len // size
        return [(rank * piece, (rank + 1) * piece)]
    chunk = seq_len // (2 * size)
    first, second = rank, 2 * size - 1 - rank
    return [(first * chunk, (first + 1) * chunk), (second * chunk, (second + 1) * chunk)]


def shard_positions(seq_len: int, rank: int, size: int, load_balance: bool,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions (LongTensor [seq_len // size]) of the tokens rank `rank` holds."""
    check_sequence_split(seq_len, size, load_balance)
    return torch.cat([torch.arange(start, end, device=device)
                      for start, end in _chunk_ranges(seq_len, rank, size, load_balance)])


def shard_sequence(tensor: torch.Tensor, cp_mesh, seq_dim: int = 1, load_balance: bool = True) -> torch.Tensor:
    """This rank's piece of a full-sequence tensor (input ids, labels, loss mask, ...)."""
    size, rank = cp_mesh.size(), cp_mesh.get_local_rank()
    seq_len = tensor.shape[seq_dim]
    check_sequence_split(seq_len, size, load_balance)
    parts = [tensor.narrow(seq_dim, start, end - start)
             for start, end in _chunk_ranges(seq_len, rank, size, load_balance)]
    return torch.cat(parts, dim=seq_dim) if len(parts) > 1 else parts[0].contiguous()


def _fill_positions(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the root Transformer: pass the global positions of the tokens this
    rank holds when the caller gave none (pipeline stages past the first never can)."""
    layout = sequence_layout(model)
    if kwargs.get("positions") is not None or (len(args) > 1 and args[1] is not None):
        return None
    if kwargs.get("kv_cache") is not None or len(args) > 2:
        return None  # generation: nothing is sharded
    tokens = args[0] if args else kwargs["tokens"]
    local = tokens.shape[1]
    if getattr(model, "tok_embeddings", None) is None:
        local *= layout.sp_degree  # hidden states arrive cut over the tensor-parallel ranks too
    if layout.cp_size == 1 and local == tokens.shape[1]:
        return None
    positions = shard_positions(local * layout.cp_size, layout.cp_rank, layout.cp_size, layout.load_balance,
                                device=tokens.device)
    return args, {**kwargs, "positions": positions}


# --------------------------------------------------------------------------------- attention


class _ContextParallelAttention(TorchFunctionMode):
    """Inside one attention module: replace scaled_dot_product_attention by attention over the
    keys and values of the whole sequence, gathered from the cp ranks."""

    def __init__(self, cp_mesh, layout: SequenceLayout, sliding_window: int | None,
                 documents: torch.Tensor | None = None, key_documents: torch.Tensor | None = None):
        super().__init__()
        self.cp_mesh = cp_mesh
        self.layout = layout
        self.sliding_window = sliding_window
        # packed documents: the local queries' document ids [B, local] and those of every key of
        # the whole sequence, in sequence order [B, seq]
        self.documents = documents
        self.key_documents = key_documents

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attend(*args, **kwargs)
        return func(*args, **kwargs)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather along the sequence dim (2 of [B, H, T, D]); backward reduce-scatters the
        gradient, since every rank's queries contribute to every key's gradient."""
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        whole = DTensor.from_local(x.contiguous(), self.cp_mesh, [Shard(2)], run_check=False)
        return whole.redistribute(self.cp_mesh, [Replicate()]).to_local(grad_placements=[Partial()])

    def _attend(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # The model built its mask for the local piece alone; the causal (and sliding-window)
        # structure is rebuilt here from global positions, so attn_mask/is_causal are ignored.
        layout = self.layout
        local = q.shape[2]
        seq_len = local * layout.cp_size
        keys, values = self._gather(k), self._gather(v)
        # gathered keys are in rank order; put them in sequence order so each query chunk reads a
        # contiguous prefix of them
        order = torch.cat([shard_positions(seq_len, r, layout.cp_size, layout.load_balance, device=q.device)
                           for r in range(layout.cp_size)]).argsort()
        keys, values = keys.index_select(2, order), values.index_select(2, order)
        outputs, offset = [], 0
        for start, end in _chunk_ranges(seq_len, layout.cp_rank, layout.cp_size, layout.load_balance):
            first_key = 0 if self.sliding_window is None else max(0, start - self.sliding_window + 1)
            q_pos = torch.arange(start, end, device=q.device)[:, None]
            k_pos = torch.arange(first_key, end, device=q.device)[None, :]
            allowed = k_pos <= q_pos
            if self.sliding_window is not None:
                allowed = allowed & (q_pos - k_pos < self.sliding_window)
            if self.documents is not None:  # [B, 1, Tq, Tk]: same document, by global position
                same = (self.documents[:, offset:offset + end - start, None]
                        == self.key_documents[:, None, first_key:end])
                allowed = (allowed & same)[:, None]
            outputs.append(F.scaled_dot_product_attention(
                q[:, :, offset:offset + end - start], keys[:, :, first_key:end], values[:, :, first_key:end],
                attn_mask=allowed, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa))
            offset += end - start
        return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


class _AttentionOverride:
    """Forward hooks of one attention module: a fresh `_ContextParallelAttention` mode entered for
    each call (and each recomputation), left when the call ends.

    Packed documents: the model's mask carries this rank's document ids; the ids of the whole
    sequence are all-gathered once per forward (`key_cache`, shared by the model's layers) and
    the mask handed to the module is the plain causal one, so that attention goes through SDPA
    (which the mode replaces) rather than flex_attention."""

    def __init__(self, cp_mesh, layout: SequenceLayout, sliding_window: int | None, key_cache: dict):
        self.cp_mesh, self.layout, self.sliding_window = cp_mesh, layout, sliding_window
        self.key_cache = key_cache
        self.active: list[_ContextParallelAttention] = []

    def enter(self, module: nn.Module, args: tuple):
        kv_cache = args[3] if len(args) > 3 else None
        if kv_cache is not None:
            raise EmberError("context parallelism is for training; generate with --context-parallel-size 1")
        mask = args[2] if len(args) > 2 else None
        documents = getattr(mask, "documents", None)
        key_documents = self._key_documents(documents) if documents is not None else None
        mode = _ContextParallelAttention(self.cp_mesh, self.layout, self.sliding_window, documents, key_documents)
        mode.__enter__()
        self.active.append(mode)
        if documents is None:
            return None
        return (*args[:2], AttentionMask(None, is_causal=True, documents=documents), *args[3:])

    def _key_documents(self, documents: torch.Tensor) -> torch.Tensor:
        if self.key_cache.get("source") is not documents:
            import torch.distributed as dist

            size = self.layout.cp_size
            pieces = [torch.empty_like(documents) for _ in range(size)]
            dist.all_gather(pieces, documents.contiguous(), group=self.cp_mesh.get_group())
            seq_len = documents.shape[1] * size
            order = torch.cat([shard_positions(seq_len, r, size, self.layout.load_balance, device=documents.device)
                               for r in range(size)]).argsort()
            self.key_cache["source"] = documents
            self.key_cache["keys"] = torch.cat(pieces, dim=1).index_select(1, order)
        return self.key_cache["keys"]

    def exit(self, module: nn.Module, args: tuple, output) -> None:
        if self.active:
            self.active.pop().__exit__(None, None, None)


class _ContextParallelBalance(LoadBalanceScope):
    """An MoE block's load-balancing scope under context parallelism: the token counts of every
    piece of the sequences (they carry no gradient, so a plain all-reduce sums them)."""

    def __init__(self, cp_group, cp_size: int):
        self.cp_group = cp_group
        self.pieces = cp_size

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(counts, group=self.cp_group)
        return counts


def apply_context_parallel(model: nn.Module, cp_mesh, load_balance: bool = True) -> None:
    """Make `model` (an ember Transformer, or a pipeline stage of one) run on this rank's piece of
    the sequence. Feed it the pieces `shard_sequence` cuts; positions are filled in automatically."""
    size = cp_mesh.size()
    if size == 1:
        return
    if sequence_layout(model).cp_size > 1:
        raise EmberError("context parallelism was already applied to this model")
    check_context_parallel(model.args, size)
    layout = set_sequence_layout(model, cp_rank=cp_mesh.get_local_rank(), cp_size=size, load_balance=load_balance)
    window = model.args.sliding_window
    key_cache: dict = {}  # the gathered document ids of the current forward, shared by the layers
    for block in model.layers.values():
        override = _AttentionOverride(cp_mesh, layout, window, key_cache)
        block.attention.register_forward_pre_hook(override.enter)
        # always_call: pop the mode even when the forward raises, so it never leaks out
        block.attention.register_forward_hook(override.exit, always_call=True)
        if block.moe is not None:
            block.moe.balance_scope = _ContextParallelBalance(cp_mesh.get_group(), size)
