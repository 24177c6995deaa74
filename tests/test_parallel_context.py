"""Context parallelism (CP2, gloo) against a single-process run of the same model and batch.

Each rank holds half of every sequence (contiguous halves, or the load-balanced "zigzag" quarters
0+3 / 1+2), runs the model on it and takes the loss over its tokens divided by the global count
of loss tokens; gradients and losses are then summed over the two ranks, as data parallelism over
the cp dimension does in training. The reference runs the whole sequence in the pytest process.
Compared: each rank's logits against the reference logits at the same global positions, the
step-0 gradients, and the loss at each of 3 AdamW steps. Cases: Llama (RoPE, GQA), Qwen3 (q/k
norm), Mistral with an 8-token sliding window, GPT-2 (learned positions), and a two-stage pipeline
cut where the second stage receives hidden states and must find its positions itself. A 4-process
run adds TP2 x CP2 with sequence parallelism over a pipeline cut.

Tolerance (fp32): CP changes only the order of reductions (the loss and the gradients are sums
of two per-rank parts; attention runs over key blocks of a different shape), so step-0 logits and
gradients are held to tests/tolerances.py; losses after AdamW steps keep abs 1e-5 (AdamW's
division by sqrt(v) turns reordering noise in near-zero gradients into a fraction of the
learning rate). A wrong position, mask or missing key shows up as O(1e-2).

This file is also the rank worker: `python tests/test_parallel_context.py OUT_DIR GROUP`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import masked_batch, seeded_stages  # noqa: E402
from dist_utils import single_thread  # noqa: E402, F401 (autouse fixture: one torch thread)
from tolerances import assert_fp32_close, rms, backward_terms, forward_terms, loss_terms  # noqa: E402
from ember.errors import EmberError  # noqa: E402
from ember.models import Transformer, get_model_args  # noqa: E402

CP = 2
STEPS = 3
SEED = 2468
BATCH, SEQ = 2, 32
LR = 1e-2

# id -> (model, overrides, load_balance, pipeline cut)
CASES = {
    "llama": ("tiny-llama", {}, False, False),
    "llama-balanced": ("tiny-llama", {}, True, False),
    "qwen3-balanced": ("tiny-qwen3", {}, True, False),
    "mistral-window-balanced": ("tiny-mistral", {"sliding_window": 8}, True, False),
    "mistral-window": ("tiny-mistral", {"sliding_window": 8}, False, False),
    "gpt2-balanced": ("tiny-gpt2", {}, True, False),
    "llama-balanced-stages": ("tiny-llama", {}, True, True),
}
# TP2 (with sequence parallelism) x CP2 on 4 processes
COMBINED_CASES = {"llama-tp2-sp-cp2-stages": ("tiny-llama", {}, True, True)}


def build_stages(model_name: str, overrides: dict, cut: bool) -> list[Transformer]:
    return seeded_stages(model_name, overrides, cut, SEED)


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return masked_batch(vocab, SEED + 1, BATCH, SEQ)


def expected_positions(rank: int, load_balance: bool) -> torch.Tensor:
    """The global positions rank `rank` holds, written out independently of ember's helper."""
    if not load_balance:
        half = SEQ // CP
        return torch.arange(rank * half, (rank + 1) * half)
    quarter = SEQ // (2 * CP)
    chunks = [rank, 2 * CP - 1 - rank]
    return torch.cat([torch.arange(c * quarter, (c + 1) * quarter) for c in chunks])


def run_reference(model_name: str, overrides: dict, cut: bool) -> dict:
    stages = build_stages(model_name, overrides, cut)
    optimizer = torch.optim.AdamW([p for s in stages for p in s.parameters()], lr=LR, weight_decay=0.1)
    inputs, labels, loss_mask = batch(stages[0].args.vocab_size)
    result = {"losses": []}
    for step in range(STEPS):
        optimizer.zero_grad()
        hidden = inputs
        for stage in stages:
            hidden = stage(hidden)
        losses = F.cross_entropy(hidden.flatten(0, 1), labels.flatten(), reduction="none")
        loss = (losses * loss_mask.flatten()).sum() / loss_mask.sum()
        loss.backward()
        result["losses"].append(loss.item())
        if step == 0:
            result["logits"] = hidden.detach()
            result["grads"] = {n: p.grad.clone() for s in stages for n, p in s.named_parameters()}
        optimizer.step()
    return result


# --------------------------------------------------------------------------------- rank worker


def rank_main(out_dir: str, group: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ember.parallel.context import apply_context_parallel, shard_sequence
    from ember.parallel.loss import cross_entropy_sum
    from ember.parallel.tensor import apply_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    combined = group == "combined"
    if combined:
        mesh = init_device_mesh("cpu", (CP, 2), mesh_dim_names=("cp", "tp"))
        cp_mesh, tp_mesh = mesh["cp"], mesh["tp"]
    else:
        cp_mesh, tp_mesh = init_device_mesh("cpu", (CP,), mesh_dim_names=("cp",)), None
    cp_group = cp_mesh.get_group()
    for case, (model_name, overrides, load_balance, cut) in (COMBINED_CASES if combined else CASES).items():
        stages = build_stages(model_name, overrides, cut)
        for stage in stages:  # torchtitan's order: TP, then CP
            if tp_mesh is not None:
                apply_tensor_parallel(stage, tp_mesh, sequence_parallel=True, loss_parallel=True)
            apply_context_parallel(stage, cp_mesh, load_balance=load_balance)
        params = [p for s in stages for p in s.parameters()]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
        inputs, labels, loss_mask = batch(stages[0].args.vocab_size)
        count = loss_mask.sum()
        inputs, labels, loss_mask = (shard_sequence(t, cp_mesh, load_balance=load_balance)
                                     for t in (inputs, labels, loss_mask))
        result = {"losses": []}
        for step in range(STEPS):
            optimizer.zero_grad()
            hidden = inputs
            for stage in stages:
                hidden = stage(hidden)
            loss = cross_entropy_sum(hidden, labels, loss_mask) / count
            loss.backward()
            # what data parallelism over the cp dimension does: sum gradients and losses
            for p in params:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                dist.all_reduce(grad, group=cp_group)
            total = loss.detach().clone()
            dist.all_reduce(total, group=cp_group)
            result["losses"].append(total.item())
            if step == 0:
                result["logits"] = hidden.full_tensor().detach() if hasattr(hidden, "full_tensor") else hidden.detach()
                result["grads"] = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                                   for s in stages for n, p in s.named_parameters()}
            optimizer.step()
        result["cp_rank"] = cp_mesh.get_local_rank()
        torch.save(result, os.path.join(out_dir, f"{case}-rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------- tests


def _spawn(tmp_path_factory, group: str, nprocs: int, cases: dict) -> dict:
    from dist_utils import run_ranks

    out_dir = tmp_path_factory.mktemp(f"cp-{group}")
    result = run_ranks([__file__, str(out_dir), group], nprocs=nprocs, timeout=300)
    assert result.returncode == 0, result.output[-6000:]
    return {case: [torch.load(out_dir / f"{case}-rank{r}.pt", weights_only=True) for r in range(nprocs)]
            for case in cases}


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    return _spawn(tmp_path_factory, "cp", CP, CASES)


@pytest.fixture(scope="module")
def combined_results(tmp_path_factory):
    return _spawn(tmp_path_factory, "combined", 2 * CP, COMBINED_CASES)


def check_against_reference(ranks: list[dict], model_name: str, overrides: dict, load_balance: bool, cut: bool) -> None:
    reference = run_reference(model_name, overrides, cut)
    args = get_model_args(model_name, **overrides)
    for result in ranks:
        positions = expected_positions(result["cp_rank"], load_balance)
        assert_fp32_close(result["logits"], reference["logits"][:, positions], terms=forward_terms(args, SEQ))
        for step in range(STEPS):
            assert result["losses"][step] == pytest.approx(reference["losses"][step], abs=1e-5), f"step {step}"
    grads = ranks[0]["grads"]
    assert set(grads) == set(reference["grads"])
    grad_terms = backward_terms(loss_terms(args, SEQ, BATCH * SEQ), tokens=BATCH * SEQ)
    grad_scale = rms(*reference["grads"].values())  # a key bias's gradient is pure cancellation
    for name, expected in reference["grads"].items():
        assert_fp32_close(grads[name], expected, terms=grad_terms, min_scale=grad_scale,
                          msg=lambda m, n=name: f"{n}: {m}")
    assert abs(reference["losses"][-1] - reference["losses"][0]) > 1e-3


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("case", list(CASES))
def test_cp2_matches_single_process(cp_results, case):
    check_against_reference(cp_results[case], *CASES[case])


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("case", list(COMBINED_CASES))
def test_tp2_cp2_matches_single_process(combined_results, case):
    check_against_reference(combined_results[case], *COMBINED_CASES[case])


class _FakeMesh:
    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return 0


@pytest.mark.parametrize("model_name,overrides,message", [
    ("tiny-bloom", {}, "ALiBi"),
    ("tiny-llama", {"attn_logit_softcap": 30.0}, "soft-capped"),
])
def test_unsupported_attention_is_refused(model_name, overrides, message):
    from ember.parallel.context import apply_context_parallel

    model = Transformer(get_model_args(model_name, **overrides))
    with pytest.raises(EmberError, match=message):
        apply_context_parallel(model, _FakeMesh(2))


def test_sequence_split_checks():
    from ember.config.layout import check_context_parallel
    from ember.parallel.context import shard_positions

    with pytest.raises(EmberError, match="multiple of 4"):
        check_context_parallel(get_model_args("tiny-llama"), 2, seq_len=30, load_balance=True)
    check_context_parallel(get_model_args("tiny-llama"), 2, seq_len=28, load_balance=True)
    # every position is held by exactly one rank, in both layouts
    for balanced in (False, True):
        held = torch.cat([shard_positions(SEQ, r, CP, balanced) for r in range(CP)])
        assert sorted(held.tolist()) == list(range(SEQ))
        for r in range(CP):
            assert shard_positions(SEQ, r, CP, balanced).tolist() == expected_positions(r, balanced).tolist()


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2])
