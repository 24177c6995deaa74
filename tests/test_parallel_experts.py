"""Expert parallelism (EP2, gloo) against a single-process run of the same micro-batches.

The reference runs the two micro-batches one after the other in one process with gradient
accumulation (each loss / 2). Under EP2 each rank runs one of them: the MoE experts live half on
each rank and tokens travel by all-to-all. Compared: logits and aux loss of each micro-batch,
the loss at each of 3 AdamW steps, and after the first backward the gradients of the router, the
experts (gathered with full_tensor) and every other parameter.

Tolerance (fp32): logits, aux loss and step-0 gradients by tests/tolerances.py; abs 1e-5 for
losses over the AdamW steps (AdamW's division by sqrt(v) turns reordering noise in near-zero
gradients into a fraction of the learning rate). The arithmetic is the same up to order: an
expert's matmul runs over the rows of both ranks at once instead of one micro-batch at a time
(BLAS blocking may differ per row count), and the gradients of replicated parameters are summed
across ranks by an all-reduce instead of accumulated in the backward. Measured on this machine: logits identical, gradients within 4e-7
of their largest element, losses within 5e-7; a token routed or dropped differently shows up as
a 1e-2 difference.

This file is also the rank worker: `python tests/test_parallel_experts.py OUT_DIR`.

Expert data parallelism under FSDP (`test_experts_sharded_over_expert_data_parallel_ranks`):
`ember train` on 4 processes with ep 2, so two expert data-parallel ranks hold each expert, under
ZeRO-1 and FSDP (the experts then FSDP2 units over those ranks, ember.parallel.fsdp): losses,
gradient norms and evaluation loss step by step as the single-process run, with
tests/test_train_layouts.py's tolerances and rank driver; and the ZeRO-1 run's checkpoint
(experts sharded over (edp, ep)) resumes at ep 4 without FSDP on the experts and in one process
with the next steps of that same run. That FSDP does hold the experts there is checked by
tests/test_plan_traffic.py (their gathers, once per ZeRO-1 step) and tests/test_plan_memory.py
(their AdamW state, sharded over the expert data-parallel ranks).
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

from dist_utils import single_thread  # noqa: E402, F401 (autouse fixture: one torch thread)
from ember.errors import EmberError  # noqa: E402
from ember.models import Transformer, get_model_args  # noqa: E402
from ember.models.moe import LocalDispatch  # noqa: E402
from tolerances import assert_fp32_close, rms, backward_terms, forward_terms, fp32_bound, loss_terms  # noqa: E402

EP = 2
STEPS = 3
SEED = 1234
BATCH, SEQ = 2, 32
# (name, model, routing settings): dropless, and capacity 1.0 (with 64 tokens x top-2 over 4
# experts, capacity is 32 per expert; random routing overfills some experts, so tokens drop)
# under both of Megatron's drop policies, one with the router z-loss; "grouped_mm": the experts
# run as one grouped GEMM (CPU's default is the per-expert loop) in both runs.
CAPACITY = {"moe_capacity_factor": 1.0}
CASES = [("mixtral-dropless", "tiny-mixtral", {}), ("mixtral-capacity", "tiny-mixtral", CAPACITY),
         ("mixtral-capacity-position-zloss-grouped", "tiny-mixtral",
          {**CAPACITY, "moe_drop_policy": "position", "moe_z_loss_coef": 1e-3, "grouped_mm": True}),
         ("grok1-dropless", "tiny-grok1", {}), ("grok1-capacity", "tiny-grok1", CAPACITY),
         ("grok1-dropless-grouped", "tiny-grok1", {"grouped_mm": True})]


def build_model(model_name: str, settings: dict) -> Transformer:
    settings = dict(settings)
    grouped_mm = settings.pop("grouped_mm", None)
    args = get_model_args(model_name, **settings)
    torch.manual_seed(SEED)
    model = Transformer(args)
    model.init_weights(seed=SEED)
    for layer in model.layers.values():
        if layer.moe is not None:
            layer.moe.experts.use_grouped_mm = grouped_mm
    return model


def micro_batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(SEED + 1)
    batches = []
    for _ in range(EP):
        tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=generator)
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    return batches


def lm_loss(model: Transformer, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(loss including the aux loss, logits, aux loss) of one micro-batch."""
    logits = model(inputs)
    aux = model.aux_loss()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)) + aux
    return loss, logits, aux


def make_optimizer(model: Transformer) -> torch.optim.Optimizer:
    # foreach=False: the parameter list mixes DTensors (experts) and plain tensors.
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)


def run_reference(model_name: str, settings: dict) -> dict:
    model = build_model(model_name, settings)
    optimizer = make_optimizer(model)
    batches = micro_batches(model.args.vocab_size)
    result = {"losses": [], "dropped": 0}

    def count_drops(moe, inputs):
        result["dropped"] += routed_over_capacity(moe, inputs[0])

    hooks = [layer.moe.register_forward_pre_hook(count_drops) for layer in model.layers.values()]
    for step in range(STEPS):
        optimizer.zero_grad()
        step_losses = []
        for index, (inputs, labels) in enumerate(batches):
            loss, logits, aux = lm_loss(model, inputs, labels)
            (loss / len(batches)).backward()
            step_losses.append(loss.item())
            if step == 0:
                result[f"logits{index}"] = logits.detach()
                result[f"aux{index}"] = aux.item()
        if step == 0:
            result["grads"] = {name: p.grad.clone() for name, p in model.named_parameters()}
            for hook in hooks:
                hook.remove()
        result["losses"].append(step_losses)
        optimizer.step()
    return result


def routed_over_capacity(moe, x: torch.Tensor) -> int:
    """Assignments over capacity for one MoE block's input (0 when dropless), recomputed from the
    router so the test knows the capacity path was exercised."""
    tokens = x.reshape(-1, x.shape[-1])
    capacity = moe.capacity(tokens.shape[0])
    if capacity is None:
        return 0
    with torch.no_grad():
        experts = torch.topk(moe.router(tokens).float().softmax(-1), moe.top_k, dim=-1).indices
    counts = torch.bincount(experts.reshape(-1), minlength=moe.num_experts)
    return int((counts - capacity).clamp(min=0).sum())


# --------------------------------------------------------------------------------- rank worker


def rank_main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ember.parallel.experts import apply_expert_parallel, expert_parameters
    from ember.train.gradients import reduce_expert_grads

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (EP,), mesh_dim_names=("ep",))
    for case, model_name, settings in CASES:
        model = build_model(model_name, settings)
        apply_expert_parallel(model, mesh)
        optimizer = make_optimizer(model)
        inputs, labels = micro_batches(model.args.vocab_size)[rank]
        expert_ids = {id(p) for p in expert_parameters(model)}
        result = {"losses": []}
        for step in range(STEPS):
            optimizer.zero_grad()
            loss, logits, aux = lm_loss(model, inputs, labels)
            loss.backward()
            # What data parallelism over the EP group does: average replicated gradients; the
            # expert gradients are already summed over both ranks by the all-to-all backward, and
            # the trainer divides them by the data-parallel size (no other rank holds the same experts).
            for param in model.parameters():
                if id(param) not in expert_ids:
                    dist.all_reduce(param.grad)
                    param.grad.div_(EP)
            reduce_expert_grads(expert_parameters(model), None, EP)
            losses = [torch.zeros(()) for _ in range(EP)]
            dist.all_gather(losses, loss.detach())
            result["losses"].append([x.item() for x in losses])
            if step == 0:
                result["logits"] = logits.detach()
                result["aux"] = aux.item()
                result["grads"] = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                                   for name, p in model.named_parameters()}
                result["local_expert_shape"] = list(model.layers["0"].moe.experts.w1.to_local().shape)
            optimizer.step()
        torch.save(result, os.path.join(out_dir, f"{case}-rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    from dist_utils import run_ranks

    out_dir = tmp_path_factory.mktemp("ep")
    result = run_ranks([__file__, str(out_dir)], nprocs=EP, timeout=240)
    assert result.returncode == 0, result.output[-4000:]
    return {case: [torch.load(out_dir / f"{case}-rank{r}.pt", weights_only=True) for r in range(EP)]
            for case, _, _ in CASES}


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("case,model_name,settings", CASES, ids=[c[0] for c in CASES])
def test_ep2_matches_single_process(ep_results, case, model_name, settings):
    reference = run_reference(model_name, settings)
    ranks = ep_results[case]
    if settings.get("moe_capacity_factor") is not None:
        assert reference["dropped"] > 0, "the capacity case must actually drop tokens"
    args = get_model_args(model_name)
    assert ranks[0]["local_expert_shape"][0] == args.num_experts // EP
    aux_terms = args.dim + 2 * args.num_experts + BATCH * SEQ  # router logits, softmax, means over tokens
    for rank, result in enumerate(ranks):
        assert_fp32_close(result["logits"], reference[f"logits{rank}"], terms=forward_terms(args, SEQ))
        assert result["aux"] > 0
        assert result["aux"] == pytest.approx(reference[f"aux{rank}"], rel=fp32_bound(aux_terms))
    for step in range(STEPS):
        assert ranks[0]["losses"][step] == pytest.approx(reference["losses"][step], abs=1e-5), f"step {step}"
    grads = ranks[0]["grads"]
    assert set(grads) == set(reference["grads"])
    grad_terms = backward_terms(loss_terms(args, SEQ, EP * BATCH * SEQ), tokens=EP * BATCH * SEQ)
    grad_scale = rms(*reference["grads"].values())  # a key bias's gradient is pure cancellation
    for name, expected in reference["grads"].items():
        assert_fp32_close(grads[name], expected, terms=grad_terms, min_scale=grad_scale,
                          msg=lambda m, n=name: f"{n}: {m}")
    for name in grads:  # both ranks end the step with the same full gradients
        torch.testing.assert_close(ranks[1]["grads"][name], grads[name], rtol=0, atol=0)


# ------------------------------------------------ expert data parallelism under FSDP (ember train)

EDP_SAVED_AT = 2


@pytest.mark.slow  # starts processes: see tests/conftest.py
def test_experts_sharded_over_expert_data_parallel_ranks(tmp_path):
    import json

    from dist_utils import read_metrics, run_ranks, train_config, write_token_dataset
    import test_train_layouts as layouts  # its rank driver, flags and tolerances
    from test_train_layouts import ITERS, LOSS_REL, NORM_REL

    from ember.train import run_training

    data = write_token_dataset(tmp_path / "tokens", seed=3)
    ep2 = ["--expert-model-parallel-size", "2"]
    checkpoint = tmp_path / "save" / f"iter_{EDP_SAVED_AT:07d}"
    runs = {  # 4 processes: dp 4, so ep 2 leaves 2 expert data-parallel ranks
        "zero1": [*ep2, "--use-distributed-optimizer", "--save", str(tmp_path / "save"),
                  "--save-interval", str(EDP_SAVED_AT)],
        "fsdp-overlap": [*ep2, "--use-torch-fsdp2", "--overlap-grad-reduce"],
        "ep4-resumed": ["--expert-model-parallel-size", "4", "--load", str(checkpoint)],
    }
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([layouts.argv(data, tmp_path / name, "tiny-mixtral", flags)
                                for name, flags in runs.items()]))
    result = run_ranks([layouts.__file__, str(spec)], 4, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.output[-5000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(train_config(layouts.argv(data, tmp_path / "reference", "tiny-mixtral")))
        run_training(train_config(layouts.argv(data, tmp_path / "one-process-resumed", "tiny-mixtral",
                                               ["--load", str(checkpoint)])))
    finally:
        torch.set_num_threads(threads)
    reference = read_metrics(tmp_path / "reference")
    for name in ("zero1", "fsdp-overlap"):
        layouts._assert_same_run(read_metrics(tmp_path / name), reference, LOSS_REL, name)
    train, evals = read_metrics(tmp_path / "zero1")  # the run the checkpoint came from, uninterrupted
    for name in ("ep4-resumed", "one-process-resumed"):
        resumed, resumed_evals = read_metrics(tmp_path / name)
        assert sorted(resumed) == list(range(EDP_SAVED_AT + 1, ITERS + 1)), name  # from the checkpoint on
        for it in resumed:
            assert resumed[it]["loss"] == pytest.approx(train[it]["loss"], rel=LOSS_REL), (name, it)
            assert resumed[it]["grad_norm"] == pytest.approx(train[it]["grad_norm"], rel=NORM_REL), (name, it)
        assert resumed_evals[ITERS]["eval_loss"] == pytest.approx(evals[ITERS]["eval_loss"], rel=LOSS_REL), name


class _FakeMesh:
    """Enough of a DeviceMesh for the validation that happens before any communication."""

    ndim = 1
    mesh_dim_names = ("ep",)

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return 0


def test_experts_not_divisible_by_ep_is_one_line_error():
    from ember.parallel.experts import apply_expert_parallel

    model = Transformer(get_model_args("tiny-mixtral", num_experts=3, moe_top_k=2))
    with pytest.raises(EmberError, match="does not divide num_experts 3") as info:
        apply_expert_parallel(model, _FakeMesh(2))
    assert "\n" not in str(info.value)


def test_dense_model_and_ep1_are_left_alone():
    from ember.parallel.experts import apply_expert_parallel

    model = Transformer(get_model_args("tiny-mixtral"))
    before = {name: type(p) for name, p in model.named_parameters()}
    apply_expert_parallel(model, _FakeMesh(1))
    assert {name: type(p) for name, p in model.named_parameters()} == before
    assert isinstance(model.layers["0"].moe.dispatcher, LocalDispatch)


if __name__ == "__main__":
    rank_main(sys.argv[1])
