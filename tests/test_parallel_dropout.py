"""Dropout masks under tensor (TP2), sequence (TP2+SP) and context (CP2) parallelism, 2 gloo ranks.

A dropout mask on a tensor sharded over ranks (this rank's attention heads; its piece of the
sequence under SP or CP) must be drawn independently on each rank, as a single process draws
independent masks for all heads and positions; on a tensor replicated over ranks (the hidden
states between blocks under TP without SP) it must be the same on every rank, or the copies of the
activations drift apart. `ember.parallel.rng` gives each case its stream.

The masks are read off the real ops: every `F.dropout` call's output (zeros where dropped), and
every `F.scaled_dot_product_attention` call run with its values widened by one-hot rows of the keys'
positions, so the extra output columns are the dropped-and-rescaled attention probabilities (the
dropout draw has the shape of the score matrix, so the widening changes neither the RNG draws
nor the output; checked below against a plain call).

"Independent" is statistical: two independent Bernoulli(keep = 1-p) masks agree at a position
with probability (1-p)^2 + p^2, 0.5 for attention (p = 0.5) and 0.58 for hidden dropout (p = 0.3);
the fractions are taken over 4224 causal attention positions and 10240 hidden positions, whose
standard deviations are below 0.008, so the bounds of +-0.05 are more than 6 of them. A rank that
repeats the other's stream agrees at every position (1.0).

Recomputation (full and selective) must replay the forward's masks in the backward: the
gradients with recomputation equal those without, bit for bit, under TP2 and TP2+SP (with
`preserve_rng_state=False` in ember.parallel.recompute they differ in 8% of the elements). Eval
mode leaves the default RNG untouched and matches a single process; dropout 0 installs nothing, so
tests/test_parallel_tensor.py's TP runs still match a single process exactly. Context parallelism
here has its streams applied by hand (`apply_dropout_streams`; TP applies them itself). An MoE
router's input jitter with dropout under SP is refused.

This file is also the rank worker: `python tests/test_parallel_dropout.py OUT_DIR`.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import masked_batch, seeded_stages  # noqa: E402
from dist_utils import single_thread  # noqa: E402, F401 (autouse fixture: one torch thread)

RANKS = 2
SEED = 1357
BATCH, SEQ = 2, 32
ATTENTION_P, HIDDEN_P = 0.5, 0.3
DROPOUT = {"attention_dropout": ATTENTION_P, "hidden_dropout": HIDDEN_P}


def agreement(p: float) -> float:
    return (1 - p) ** 2 + p ** 2


# ------------------------------------------------------------------------------ mask capture


@contextmanager
def captured_masks(key_positions: torch.Tensor | None, seq_len: int):
    """Record the masks of every F.dropout call (True = kept) and, unless `key_positions` is None,
    every attention call (kept probabilities over the keys' global positions) while the block runs.
    (Context parallelism replaces F.scaled_dot_product_attention itself: leave it alone there.)"""
    record = {"hidden": [], "attention": []}
    dropout, attention = F.dropout, F.scaled_dot_product_attention

    def recording_dropout(x, p=0.5, training=True, inplace=False):
        out = dropout(x, p, training, inplace)
        record["hidden"].append((out != 0).detach().clone())
        return out

    def recording_attention(q, k, v, *args, **kwargs):
        # one-hot rows of the keys' positions, appended to the values: out[..., dv:] = kept probs
        one_hot = F.one_hot(key_positions, seq_len).to(v.dtype).expand(*v.shape[:2], -1, -1)
        out = attention(q, k, torch.cat([v, one_hot], dim=-1), *args, **kwargs)
        record["attention"].append((out[..., v.shape[-1]:] != 0).detach().clone())
        return out[..., :v.shape[-1]]

    F.dropout = recording_dropout
    if key_positions is not None:
        F.scaled_dot_product_attention = recording_attention
    try:
        yield record
    finally:
        F.dropout, F.scaled_dot_product_attention = dropout, attention


def forward_masks(model, inputs, seed: int, positions: torch.Tensor | None = None) -> dict:
    """One training forward from `seed`: the masks (attention's when the model sees `positions`
    as its keys), and the hidden states entering the final norm (replicated across tp ranks
    without SP)."""
    seen = {}
    handle = model.norm.register_forward_pre_hook(lambda module, args: seen.update(final=args[0].detach().clone()))
    torch.manual_seed(seed)
    with captured_masks(positions, SEQ) as record:
        model(inputs)
    handle.remove()
    final = seen["final"]
    return {**record, "final": final.to_local() if hasattr(final, "to_local") else final, "positions": positions}


# --------------------------------------------------------------------------------- rank worker


def tensor_parallel_model(mesh, sequence_parallel: bool, dropout: dict = DROPOUT):
    from ember.parallel.tensor import apply_tensor_parallel

    model = seeded_stages("tiny-llama", dropout, cut=False, seed=SEED)[0]
    apply_tensor_parallel(model, mesh, sequence_parallel=sequence_parallel, loss_parallel=True)
    return model.train()


def gradients(model, granularity: str | None) -> dict:
    from ember.parallel.loss import cross_entropy_sum
    from ember.parallel.recompute import apply_recompute

    apply_recompute(model, granularity)
    inputs, labels, loss_mask = masked_batch(model.args.vocab_size, SEED + 1, BATCH, SEQ)
    torch.manual_seed(SEED + 2)
    loss = cross_entropy_sum(model(inputs), labels, loss_mask) / loss_mask.sum()
    loss.backward()
    return {name.replace("_checkpoint_wrapped_module.", ""): p.grad.to_local().clone()
            for name, p in model.named_parameters()}


def rank_main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ember.parallel.context import apply_context_parallel, shard_sequence
    from ember.parallel.rng import apply_dropout_streams

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tp_mesh = init_device_mesh("cpu", (RANKS,), mesh_dim_names=("tp",))
    cp_mesh = init_device_mesh("cpu", (RANKS,), mesh_dim_names=("cp",))
    inputs = masked_batch(512, SEED + 1, BATCH, SEQ)[0]
    result = {}
    for case, sp in (("tp", False), ("tp-sp", True)):
        model = tensor_parallel_model(tp_mesh, sp)
        keys = torch.arange(SEQ)
        result[case] = forward_masks(model, inputs, SEED, keys)
        result[f"{case}-again"] = forward_masks(model, inputs, SEED, keys)
        result[f"{case}-other-seed"] = forward_masks(model, inputs, SEED + 100, keys)
        for granularity in (None, "full", "selective"):
            result[f"{case}-grads-{granularity}"] = gradients(tensor_parallel_model(tp_mesh, sp), granularity)
        # eval mode: no dropout, and the default RNG is not touched
        state = torch.get_rng_state()
        with torch.no_grad():
            logits = model.eval()(inputs)
        result[f"{case}-eval-logits"] = logits.full_tensor()
        result[f"{case}-eval-rng-untouched"] = torch.equal(state, torch.get_rng_state())
    # context parallelism (load-balanced halves), its dropout streams applied by hand
    model = seeded_stages("tiny-llama", DROPOUT, cut=False, seed=SEED)[0]
    apply_context_parallel(model, cp_mesh, load_balance=True)
    apply_dropout_streams(model)
    result["cp"] = forward_masks(model.train(), shard_sequence(inputs, cp_mesh), SEED)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from dist_utils import run_ranks

    out_dir = tmp_path_factory.mktemp("dropout")
    result = run_ranks([__file__, str(out_dir)], nprocs=RANKS, timeout=240)
    assert result.returncode == 0, result.output[-6000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(RANKS)]


def causal_fraction_equal(a: torch.Tensor, b: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> float:
    """Fraction of positions, causal for both ranks' queries, where two attention masks agree."""
    keys = torch.arange(a.shape[-1])
    allowed = (keys[None, :] <= q_a[:, None]) & (keys[None, :] <= q_b[:, None])
    return (a == b)[..., allowed].float().mean().item()


def attention_masks(record: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mask, its causal positions) per attention call; a query's kept probabilities."""
    keys = torch.arange(SEQ)
    return [(mask, keys[None, :] <= record["positions"][:, None]) for mask in record["attention"]]


def kept_fraction(masks: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return torch.cat([mask[..., allowed].flatten() for mask, allowed in masks]).float().mean().item()


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("case", ["tp", "tp-sp"])
def test_attention_dropout_differs_across_tensor_parallel_heads(ranks, case):
    first, second = ranks[0][case], ranks[1][case]
    assert len(first["attention"]) == 2  # one call per layer
    equal = [causal_fraction_equal(a, b, first["positions"], second["positions"])
             for a, b in zip(first["attention"], second["attention"])]
    assert sum(equal) / len(equal) == pytest.approx(agreement(ATTENTION_P), abs=0.05), equal
    for rank in ranks:  # the masks are dropout masks of the right rate
        assert kept_fraction(attention_masks(rank[case])) == pytest.approx(1 - ATTENTION_P, abs=0.05)


@pytest.mark.slow  # starts processes: see tests/conftest.py
def test_hidden_dropout_is_identical_across_tensor_parallel_ranks_without_sp(ranks):
    first, second = ranks[0]["tp"], ranks[1]["tp"]
    assert len(first["hidden"]) == 5  # embeddings, then attention and MLP outputs of 2 layers
    for a, b in zip(first["hidden"], second["hidden"]):
        assert a.shape == (BATCH, SEQ, 64)
        assert torch.equal(a, b)
    # the replicated activations stayed replicated
    torch.testing.assert_close(first["final"], second["final"], rtol=0, atol=0)
    kept = torch.cat([mask.flatten() for mask in first["hidden"]]).float().mean().item()
    assert kept == pytest.approx(1 - HIDDEN_P, abs=0.05)


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("case", ["tp-sp", "cp"])
def test_hidden_dropout_differs_across_sequence_shards(ranks, case):
    first, second = ranks[0][case], ranks[1][case]
    assert len(first["hidden"]) == 5
    for mask in first["hidden"]:
        assert mask.shape == (BATCH, SEQ // 2, 64)  # this rank's half of the sequence
    equal = torch.cat([(a == b).flatten() for a, b in zip(first["hidden"], second["hidden"])]).float().mean().item()
    assert equal == pytest.approx(agreement(HIDDEN_P), abs=0.05)


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("case", ["tp", "tp-sp"])
def test_masks_are_deterministic_for_a_seed(ranks, case):
    for rank in ranks:
        again, other = rank[f"{case}-again"], rank[f"{case}-other-seed"]
        for kind in ("hidden", "attention"):
            for a, b in zip(rank[case][kind], again[kind]):
                assert torch.equal(a, b)
        assert not all(torch.equal(a, b) for a, b in zip(rank[case]["hidden"], other["hidden"]))


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("case", ["tp", "tp-sp"])
@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recomputation_replays_the_masks(ranks, case, granularity):
    for rank in ranks:
        plain, recomputed = rank[f"{case}-grads-None"], rank[f"{case}-grads-{granularity}"]
        assert set(plain) == set(recomputed)
        for name, grad in plain.items():
            torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("case", ["tp", "tp-sp"])
def test_eval_mode_matches_single_process_and_leaves_rng_alone(ranks, case):
    from tolerances import assert_fp32_close, forward_terms

    model = seeded_stages("tiny-llama", DROPOUT, cut=False, seed=SEED)[0].eval()
    inputs = masked_batch(512, SEED + 1, BATCH, SEQ)[0]
    with torch.no_grad():
        expected = model(inputs)
    for rank in ranks:
        assert rank[f"{case}-eval-rng-untouched"]
        assert_fp32_close(rank[f"{case}-eval-logits"], expected, terms=forward_terms(model.args, SEQ))


def test_widened_attention_values_change_nothing():
    """The capture's premise: appending one-hot rows to the values leaves the draws and the output
    of SDPA's dropout as they were, and the extra columns show the kept positions."""
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    torch.manual_seed(0)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=ATTENTION_P, enable_gqa=True)
    torch.manual_seed(0)
    with captured_masks(torch.arange(8), 8) as record:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=ATTENTION_P, enable_gqa=True)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    kept = record["attention"][0][..., torch.ones(8, 8, dtype=torch.bool).tril()].float().mean().item()
    assert 0.3 < kept < 0.7


class _FakeMesh:
    """Enough of a DeviceMesh for the checks that run before any communication."""

    def size(self) -> int:
        return RANKS

    def get_local_rank(self) -> int:
        return 0


def test_router_jitter_with_dropout_under_sequence_parallelism_is_refused():
    from ember.errors import EmberError
    from ember.models import Transformer, get_model_args
    from ember.parallel.rng import apply_dropout_streams

    jitter = {"moe_input_jitter": 0.01}
    model = Transformer(get_model_args("tiny-mixtral", **jitter, **DROPOUT))
    with pytest.raises(EmberError, match="--moe-input-jitter-eps 0"):
        apply_dropout_streams(model, _FakeMesh(), sequence_parallel=True)
    # without sp the router runs outside every per-rank region; without dropout there is none
    apply_dropout_streams(Transformer(get_model_args("tiny-mixtral", **jitter, **DROPOUT)), _FakeMesh())
    apply_dropout_streams(Transformer(get_model_args("tiny-mixtral", **jitter)), _FakeMesh(), sequence_parallel=True)


def test_no_dropout_installs_no_hooks():
    """Dropout 0: nothing drawn, and no hook to break a compiled block's graph."""
    from ember.models import Transformer, get_model_args
    from ember.parallel.rng import apply_dropout_streams

    plain, dropped = Transformer(get_model_args("tiny-llama")), Transformer(get_model_args("tiny-llama", **DROPOUT))
    for model in (plain, dropped):
        apply_dropout_streams(model, _FakeMesh())
    assert not plain._forward_pre_hooks and not plain.layers["0"].attention._forward_pre_hooks
    assert dropped._forward_pre_hooks and dropped.layers["0"].attention._forward_pre_hooks


if __name__ == "__main__":
    rank_main(sys.argv[1])
