"""Tensor parallelism (TP2, gloo), with and without sequence parallelism, against a single-process
run of the same model and batch.

Every case builds the same tiny model from the same seed, takes 3 AdamW steps on one batch
(loss: token cross-entropy summed over a random loss mask / mask count, plus the MoE aux loss)
and records the step-0 logits and gradients (gathered with `full_tensor()`) and the loss at every
step. The reference runs the identical loop on the plain model with `F.cross_entropy`, in the
pytest process. Cases cover Llama (GQA), Qwen2 (q/k/v biases, tied embeddings), Qwen3 (q/k norm,
head_dim != dim/heads), Mixtral (MoE experts sharded over their ffn dim, aux loss), Grok-1 (MoE,
sandwich norms, multipliers), Bloom (ALiBi, LayerNorm with biases, embedding norm), GPT-2
(learned positions) and Mistral (sliding window), and a two-stage pipeline cut run stage after
stage under sequence parallelism (the second stage receives sequence-sharded hidden states).
The global gradient norm (what clipping uses) is compared too, and three models are also built
the trainer's way (meta device, shard, allocate, load full weights) and read back whole.

Tolerance (fp32): TP changes only the order of reductions: a row-parallel matmul sums two
half-length dot products and all-reduces them, the vocab-parallel softmax combines two partial
sums, replicated weights sum their gradients over ranks. So step-0 logits, gradients and
gradient norm are held to tests/tolerances.py (the error of fp32 sums of the model's reduction
lengths). Losses after AdamW steps keep abs 1e-5: AdamW divides by sqrt(v), so a reordering
difference in a near-zero gradient component moves that weight by a fraction of the learning
rate, beyond what reduction lengths predict (a wrong shard, head count, mask or missing
reduction shows up as O(1e-2) or worse).

This file is also the rank worker: `python tests/test_parallel_tensor.py OUT_DIR`.
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
from tolerances import assert_fp32_close, rms, backward_terms, forward_terms, fp32_bound, loss_terms  # noqa: E402
from ember.errors import EmberError  # noqa: E402
from ember.models import Transformer, get_model_args  # noqa: E402

TP = 2
STEPS = 3
SEED = 4321
BATCH, SEQ = 2, 32
LR = 1e-2

# id -> (model, overrides, sequence_parallel, loss_parallel, pipeline cut)
CASES = {
    "llama": ("tiny-llama", {}, False, True, False),
    "llama-sp": ("tiny-llama", {}, True, True, False),
    "llama-gathered-logits": ("tiny-llama", {}, True, False, False),
    "qwen2": ("tiny-qwen2", {}, False, True, False),
    "qwen2-sp": ("tiny-qwen2", {}, True, True, False),
    "qwen3": ("tiny-qwen3", {}, False, True, False),
    "qwen3-sp": ("tiny-qwen3", {}, True, True, False),
    "mixtral": ("tiny-mixtral", {}, False, True, False),
    "mixtral-sp": ("tiny-mixtral", {}, True, True, False),
    "grok1-sp": ("tiny-grok1", {"num_shared_experts": 1}, True, True, False),
    "bloom": ("tiny-bloom", {}, False, True, False),
    "bloom-sp": ("tiny-bloom", {}, True, True, False),
    "gpt2-sp": ("tiny-gpt2", {}, True, True, False),
    "mistral-window-sp": ("tiny-mistral", {"sliding_window": 8}, True, True, False),
    "llama-sp-stages": ("tiny-llama", {}, True, True, True),
    "bloom-sp-stages": ("tiny-bloom", {}, True, True, True),
    "mistral-window-sp-stages": ("tiny-mistral", {"sliding_window": 8}, True, True, True),
}


def build_stages(model_name: str, overrides: dict, cut: bool) -> list[Transformer]:
    return seeded_stages(model_name, overrides, cut, SEED)


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return masked_batch(vocab, SEED + 1, BATCH, SEQ)


def run_steps(stages: list[Transformer], loss_fn) -> dict:
    params = [p for stage in stages for p in stage.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
    inputs, labels, loss_mask = batch(stages[0].args.vocab_size)
    result = {"losses": []}
    for step in range(STEPS):
        optimizer.zero_grad()
        hidden = inputs
        for stage in stages:
            hidden = stage(hidden)
        loss = loss_fn(hidden, labels, loss_mask) / loss_mask.sum()
        loss = loss + sum(stage.aux_loss() for stage in stages)
        loss.backward()
        result["losses"].append(loss.item())
        if step == 0:
            # the global gradient norm clipping uses: DTensor must combine sharded, replicated
            # and partial (not yet summed) gradients correctly
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            result["grad_norm"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
            result["logits"] = hidden.full_tensor().detach() if hasattr(hidden, "full_tensor") else hidden.detach()
            result["grads"] = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                               for stage in stages for name, p in stage.named_parameters()}
        optimizer.step()
    return result


def reference_loss(logits, labels, loss_mask):
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return (losses * loss_mask.flatten()).sum()


# --------------------------------------------------------------------------------- rank worker


def rank_main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ember.parallel.loss import cross_entropy_sum
    from ember.parallel.tensor import apply_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    for case, (model_name, overrides, sp, loss_parallel, cut) in CASES.items():
        stages = build_stages(model_name, overrides, cut)
        for stage in stages:
            apply_tensor_parallel(stage, mesh, sequence_parallel=sp, loss_parallel=loss_parallel)
        result = run_steps(stages, cross_entropy_sum)
        attention = stages[0].layers["0"].attention
        result["local_heads"] = [attention.n_heads, attention.n_kv_heads]
        result["wq_local_rows"] = attention.wq.weight.to_local().shape[0]
        with torch.no_grad():
            inputs = batch(stages[0].args.vocab_size)[0]
            hidden = inputs
            for stage in stages:
                hidden = stage(hidden)
        result["logits_type"] = f"{type(hidden).__name__}{getattr(hidden, 'placements', '')}"
        torch.save(result, os.path.join(out_dir, f"{case}-rank{rank}.pt"))
    for model_name in META_MODELS:
        torch.save(meta_built_logits(model_name, mesh), os.path.join(out_dir, f"meta-{model_name}-rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


META_MODELS = ["tiny-qwen3", "tiny-mixtral", "tiny-bloom"]


def meta_built_logits(model_name: str, mesh) -> dict:
    """What the trainer does: build on the meta device, shard, allocate, load full weights; then
    read the full weights back."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from ember.parallel.tensor import apply_tensor_parallel

    weights = build_stages(model_name, {}, cut=False)[0].state_dict()
    with torch.device("meta"):
        model = Transformer(get_model_args(model_name))
    apply_tensor_parallel(model, mesh, sequence_parallel=True, loss_parallel=False)
    model.to_empty(device="cpu")
    model.init_buffers("cpu")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
    with torch.no_grad():
        logits = model(batch(model.args.vocab_size)[0])
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {"logits": logits, "state": full}


# --------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    from dist_utils import run_ranks

    out_dir = tmp_path_factory.mktemp("tp")
    result = run_ranks([__file__, str(out_dir)], nprocs=TP, timeout=300)
    assert result.returncode == 0, result.output[-6000:]
    cases = list(CASES) + [f"meta-{name}" for name in META_MODELS]
    return {case: [torch.load(out_dir / f"{case}-rank{r}.pt", weights_only=True) for r in range(TP)] for case in cases}


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_single_process(tp_results, case):
    model_name, overrides, sp, loss_parallel, cut = CASES[case]
    reference = run_steps(build_stages(model_name, overrides, cut), reference_loss)
    args = get_model_args(model_name, **overrides)
    grad_terms = backward_terms(loss_terms(args, SEQ, BATCH * SEQ), tokens=BATCH * SEQ)
    ranks = tp_results[case]
    for result in ranks:
        assert result["local_heads"] == [args.n_heads // TP, args.n_kv_heads // TP]
        assert result["wq_local_rows"] == args.n_heads * args.head_dim // TP
        assert result["logits_type"] == ("DTensor(Shard(dim=2),)" if loss_parallel else "Tensor"), result["logits_type"]
        assert_fp32_close(result["logits"], reference["logits"], terms=forward_terms(args, SEQ))
        for step in range(STEPS):
            assert result["losses"][step] == pytest.approx(reference["losses"][step], abs=1e-5), f"step {step}"
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=fp32_bound(grad_terms))
    grads = ranks[0]["grads"]
    assert set(grads) == set(reference["grads"])
    grad_scale = rms(*reference["grads"].values())  # a key bias's gradient is pure cancellation
    for name, expected in reference["grads"].items():
        assert_fp32_close(grads[name], expected, terms=grad_terms, min_scale=grad_scale,
                          msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(ranks[1]["grads"][name], grads[name], rtol=0, atol=0)
    # the steps changed the model: the later losses test the sharded optimizer update too
    assert abs(reference["losses"][-1] - reference["losses"][0]) > 1e-3


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("model_name", META_MODELS)
def test_meta_built_tp_model_takes_full_weights(tp_results, model_name):
    model = build_stages(model_name, {}, cut=False)[0]
    weights = model.state_dict()
    with torch.no_grad():
        expected = model(batch(model.args.vocab_size)[0])
    for result in tp_results[f"meta-{model_name}"]:
        assert_fp32_close(result["logits"], expected, terms=forward_terms(model.args, SEQ))
        assert set(result["state"]) == set(weights)
        for name, tensor in weights.items():
            torch.testing.assert_close(result["state"][name], tensor, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


class _FakeMesh:
    """Enough of a DeviceMesh for the checks that run before any communication."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize("overrides,tp,message", [
    ({"n_heads": 6, "n_kv_heads": 6, "dim": 96}, 4, "n_heads 6"),
    ({}, 4, "n_kv_heads 2"),
    ({"vocab_size": 501}, 2, "--make-vocab-size-divisible-by"),
    ({"ffn_dim": 175}, 2, "ffn_dim 175"),
])
def test_impossible_layouts_are_refused(overrides, tp, message):
    from ember.parallel.tensor import apply_tensor_parallel

    model = Transformer(get_model_args("tiny-llama", **overrides))
    with pytest.raises(EmberError, match=message.replace("-", r"\-")):
        apply_tensor_parallel(model, _FakeMesh(tp))


def test_expert_ffn_and_sequence_length_checks():
    from ember.config.layout import check_tensor_parallel

    with pytest.raises(EmberError, match="moe_ffn_dim 90"):
        check_tensor_parallel(get_model_args("tiny-mixtral", n_kv_heads=4, moe_ffn_dim=90), 4)
    with pytest.raises(EmberError, match="sequence length 30"):
        check_tensor_parallel(get_model_args("tiny-llama", n_kv_heads=4), 4, sequence_parallel=True, seq_len=30)
    check_tensor_parallel(get_model_args("tiny-llama"), 2, sequence_parallel=True, seq_len=32)


def test_loss_on_whole_logits_matches_torch():
    from ember.parallel.loss import cross_entropy_sum

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    labels_padded = torch.where(mask.bool(), labels, -100)  # masked labels may be out of range
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    expected = (expected * mask.flatten()).sum()
    got = cross_entropy_sum(logits, labels_padded, mask)
    torch.testing.assert_close(got, expected)
    assert cross_entropy_sum(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item(), rel=1e-6)


if __name__ == "__main__":
    rank_main(sys.argv[1])
