"""Pipeline parallelism on gloo: GPipe, 1F1B and interleaved 1F1B over 2 and 4 processes give the
losses, gradients and updated weights of one process running the same micro-batches.

Reference: in every rank, a copy of the same seeded model trains in one process on the same data,
with the trainer's loss definition (masked CE summed per micro-batch, divided by the loss tokens
of the whole batch; MoE aux loss weighted loss_scale / n_microbatches). Each rank compares the
parameters its stages own, by full-model name; the test checks that together they cover the model.

Tolerance (fp32): a stage runs exactly the reference's per-micro-batch ops, so activations and
most gradients agree bit for bit. What may differ is the order of a few sums: the tied embedding
gradient (embedding and head contributions are summed per stage, then added), gradient
accumulation over micro-batches under the interleaved schedule, and the fp16-style loss scale
divided back out. Each reorders fp32 additions, ~1e-7 relative. Hence rtol 1e-5 / atol 1e-6 on
gradients and 1e-6 relative on losses (the reference loss is summed in float64, the pipeline's in
fp32). AdamW divides by sqrt(v), so for gradient components near zero a 1e-7 difference can move
an update by a fraction of the learning rate: weights are compared with atol 2e-3 · lr. All are
well above reordering noise and far below any real error (a wrong normaliser, a missing
micro-batch or a lost aux/tied gradient moves losses by >= 1e-3 and weights by ~lr).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from ember.config.layout import check_schedule, split_layers, virtual_stages_per_rank
from ember.errors import EmberError
from ember.parallel.pipeline import cut_to_stage, stage_ids_on_rank

STEPS = 3
SEQ = 32
MICRO_BATCH = 2
LOSS_RTOL = 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6
LR = 1e-2
PARAM_ATOL = 2e-3 * LR


# ------------------------------------------------------------------------------ single process


def test_split_layers_even_and_uneven():
    assert split_layers(8, 4) == [2, 2, 2, 2]
    assert split_layers(7, 4, first=1) == [1, 2, 2, 2]
    assert split_layers(6, 4, first=1, last=1) == [1, 2, 2, 1]
    assert split_layers(6, 4, first=0) == [0, 2, 2, 2]
    assert split_layers(5, 2, first=2, last=3) == [2, 3]
    assert split_layers(3, 1) == [3]


@pytest.mark.parametrize("n_layers, stages, first, last, words", [
    (5, 4, None, None, "decoder-first-pipeline-num-layers"),
    (8, 4, 3, None, "do not split evenly"),
    (4, 4, 2, 2, "do not split evenly"),  # nothing left for the middle stages
    (4, 2, 1, 2, "must equal num-layers"),
    (4, 3, 3, 3, "only 4"),
    (4, 1, 1, None, "at least 2 pipeline stages"),
    (4, 2, -1, None, ">= 0"),
])
def test_split_layers_rejects_impossible_layouts(n_layers, stages, first, last, words):
    with pytest.raises(EmberError, match=words):
        split_layers(n_layers, stages, first, last)


def test_virtual_stages_and_stage_placement():
    assert virtual_stages_per_rank(8, 2, None) == 1
    assert virtual_stages_per_rank(8, 2, 2) == 2
    with pytest.raises(EmberError, match="num-layers-per-virtual-pipeline-stage"):
        virtual_stages_per_rank(8, 2, 3)
    assert stage_ids_on_rank(1, 4, 2) == [1, 5]  # Megatron's interleaved placement


@pytest.mark.parametrize("name, n_mb, pp, per_rank, words", [
    ("1f1b", 2, 4, 1, "at least as many micro-batches"),
    ("interleaved_1f1b", 4, 2, 1, "2 or more virtual stages"),
    ("interleaved_1f1b", 9, 4, 2, "multiple of 4"),
    ("gpipe", 4, 2, 2, "one stage per pipeline rank"),
])
def test_check_schedule_rejects(name, n_mb, pp, per_rank, words):
    with pytest.raises(EmberError, match=words):
        check_schedule(name, n_mb, pp, per_rank)
    check_schedule(name, max(n_mb, pp) * pp, pp, 2 if name == "interleaved_1f1b" else 1)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3", "tiny-mixtral", "tiny-gpt2"])
def test_cut_stages_chained_equal_whole_model(model):
    """The cut is right before any communication: stages applied in sequence in one process give
    the whole model's logits exactly."""
    from ember.models import Transformer, get_model_args

    torch.manual_seed(0)
    whole = Transformer(get_model_args(model, n_layers=5, vocab_size=256, max_seq_len=64))
    whole.init_weights(seed=0)
    counts = split_layers(5, 3, first=1)
    starts = [sum(counts[:i]) for i in range(3)]
    stages = [cut_to_stage(copy.deepcopy(whole), range(s, s + c), i == 0, i == 2)
              for i, (s, c) in enumerate(zip(starts, counts))]
    assert [len(s.layers) for s in stages] == counts
    assert stages[1].tok_embeddings is None and stages[1].output is None
    tokens = torch.randint(0, 256, (2, 16))
    hidden = tokens
    with torch.no_grad():
        for stage in stages:
            hidden = stage(hidden)
        assert torch.equal(hidden, whole(tokens))


# ------------------------------------------------------------------------------ multi-process


CASES_PP2 = [
    # name, model, schedule, layers, n_microbatches, virtual stages, first, last, loss scale, calls per step
    dict(id="llama-gpipe-scaled", model="tiny-llama", schedule="gpipe", layers=2, n_mb=2, loss_scale=1024.0),
    dict(id="llama-1f1b", model="tiny-llama", schedule="1f1b", layers=2, n_mb=4),
    dict(id="qwen3-1f1b-accumulate", model="tiny-qwen3", schedule="1f1b", layers=2, n_mb=2, calls=2),
    dict(id="llama-interleaved", model="tiny-llama", schedule="interleaved_1f1b", layers=4, n_mb=4, virtual=2),
    dict(id="qwen3-1f1b", model="tiny-qwen3", schedule="1f1b", layers=2, n_mb=2),
    dict(id="qwen3-interleaved-uneven", model="tiny-qwen3", schedule="interleaved_1f1b", layers=6, n_mb=2,
         virtual=2, first=1, last=1),
    dict(id="mixtral-1f1b-aux", model="tiny-mixtral", schedule="1f1b", layers=2, n_mb=2),
]
CASES_PP4 = [
    dict(id="llama-1f1b-uneven", model="tiny-llama", schedule="1f1b", layers=6, n_mb=4, first=1, last=1),
    dict(id="qwen3-gpipe-embedding-only-first", model="tiny-qwen3", schedule="gpipe", layers=6, n_mb=2, first=0),
]


def _batch(step: int, call: int, rows: int, vocab: int):
    gen = torch.Generator().manual_seed(1000 * step + call)
    ids = torch.randint(0, vocab, (rows, SEQ), generator=gen)
    labels = torch.randint(0, vocab, (rows, SEQ), generator=gen)
    # uneven loss tokens per micro-batch, so a per-micro-batch mean would be caught
    mask = (torch.rand(rows, SEQ, generator=gen) < torch.linspace(0.3, 0.95, rows)[:, None]).float()
    return ids, labels, mask


def _reference_backward(model, batches, loss_scale: float, n_mb_per_call: int) -> float:
    """The trainer's objective on one process: per micro-batch, masked CE sum · scale / tokens,
    plus the aux loss · scale / n_microbatches."""
    import torch.nn.functional as F

    tokens = sum(mask.sum() for _, _, mask in batches).clamp(min=1.0)
    scale = loss_scale * 1 / tokens
    total = 0.0
    for ids, labels, mask in batches:
        for i in range(0, ids.shape[0], MICRO_BATCH):
            sl = slice(i, i + MICRO_BATCH)
            logits = model(ids[sl])
            losses = F.cross_entropy(logits.float().flatten(0, 1), labels[sl].flatten(), reduction="none")
            micro = (losses * mask[sl].flatten()).sum()
            objective = micro * scale
            if model.args.num_experts:
                objective = objective + model.aux_loss() * loss_scale / n_mb_per_call
            objective.backward()
            total += float(micro.detach())
    return total / float(tokens)


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (atol/rtol + |b|): <= rtol means allclose(a, b, rtol, atol)."""
    return float(((a - b).abs() / (GRAD_ATOL / GRAD_RTOL + b.abs())).max())


def _run_case(case: dict, pp_mesh) -> dict:
    import torch.nn.functional as F

    from ember.models import Transformer, get_model_args
    from ember.parallel.pipeline import (
        build_pipeline_stages,
        build_schedule,
        pipeline_eval_step,
        pipeline_train_step,
    )
    from ember.train.gradients import global_grad_norm

    loss_scale, calls, n_mb = case.get("loss_scale", 1.0), case.get("calls", 1), case["n_mb"]
    args = get_model_args(case["model"], n_layers=case["layers"], vocab_size=256, max_seq_len=64)
    torch.manual_seed(0)
    whole = Transformer(args)
    whole.init_weights(seed=0)
    reference = copy.deepcopy(whole)
    parts = build_pipeline_stages(whole, pp_mesh, virtual_stages=case.get("virtual", 1),
                                  first_stage_layers=case.get("first"), last_stage_layers=case.get("last"))
    pipeline = build_schedule(parts, case["schedule"], n_mb)
    optimizer = torch.optim.AdamW(parts.parameters(), lr=LR, weight_decay=0.1)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.1)
    ref_params = dict(reference.named_parameters())

    result = {"losses": [], "ref_losses": [], "grad_diff": 0.0, "param_diff": 0.0, "grad_norm": [],
              "names": sorted(name for name, _ in parts.named_parameters())}
    for step in range(STEPS):
        batches = [_batch(step, call, n_mb * MICRO_BATCH, args.vocab_size) for call in range(calls)]
        num_tokens = sum(mask.sum() for _, _, mask in batches)
        loss = sum(pipeline_train_step(pipeline, ids, labels, mask, num_tokens=num_tokens, loss_scale=loss_scale,
                                       finish_gradients=call == calls - 1, broadcast_loss=True)
                   for call, (ids, labels, mask) in enumerate(batches))
        result["losses"].append(float(loss))
        result["ref_losses"].append(_reference_backward(reference, batches, loss_scale, n_mb))

        for name, param in parts.named_parameters():
            ref = ref_params["tok_embeddings.weight" if name == "output.weight" and args.tie_embeddings else name]
            result["grad_diff"] = max(result["grad_diff"], _max_rel_diff(param.grad, ref.grad))
        norm = global_grad_norm(parts.parameters_for_grad_norm(), parts.pp_group)  # the trainer's norm
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        result["grad_norm"].append([float(norm), float(ref_norm)])

        for params in (parts.parameters(), reference.parameters()):
            for param in params:
                param.grad.div_(loss_scale)
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    ids, labels, mask = _batch(STEPS, 0, n_mb * MICRO_BATCH, args.vocab_size)
    with torch.no_grad():
        ref_logits = reference(ids).float().flatten(0, 1)
        ref_sum = (F.cross_entropy(ref_logits, labels.flatten(), reduction="none") * mask.flatten()).sum()
    result["eval"] = [float(pipeline_eval_step(pipeline, ids, labels, mask, broadcast_loss=True)), float(ref_sum)]
    for name, param in parts.named_parameters():
        ref = ref_params["tok_embeddings.weight" if name == "output.weight" and args.tie_embeddings else name]
        result["param_diff"] = max(result["param_diff"], float((param.detach() - ref.detach()).abs().max()))
    return result


def _worker(out_dir: str, layout: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    cases = CASES_PP2 if layout == "pp2" else CASES_PP4
    results = {case["id"]: _run_case(case, mesh["pp"]) for case in cases}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()  # the last pipeline sends land before any rank tears the group down
    dist.destroy_process_group()


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("layout, nprocs, cases", [("pp2", 2, CASES_PP2), ("pp4", 4, CASES_PP4)])
def test_pipeline_matches_single_process(tmp_path, layout, nprocs, cases):
    from dist_utils import run_ranks

    repo = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    result = run_ranks([__file__, str(tmp_path), layout], nprocs, timeout=240, cwd=repo, env=env)
    assert result.returncode == 0, result.output[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nprocs)]

    for case in cases:
        name = case["id"]
        per_rank = [r[name] for r in ranks]
        for r, got in enumerate(per_rank):
            ref = got["ref_losses"]
            assert got["losses"] == pytest.approx(ref, rel=LOSS_RTOL), (name, r)
            assert abs(ref[-1] - ref[0]) > 1e-2, name  # training moved: agreement is not trivial
            assert got["grad_diff"] <= GRAD_RTOL, (name, r, got["grad_diff"])
            assert got["param_diff"] <= PARAM_ATOL, (name, r, got["param_diff"])
            assert got["eval"][0] == pytest.approx(got["eval"][1], rel=LOSS_RTOL), (name, r)
            for norm, ref_norm in got["grad_norm"]:
                assert norm == pytest.approx(ref_norm, rel=1e-5), (name, r)
        # the stages cover the model, each parameter once (the tied head copy aside)
        names = [n for got in per_rank for n in got["names"]]
        from ember.models import Transformer, get_model_args

        with torch.device("meta"):
            whole = Transformer(get_model_args(case["model"], n_layers=case["layers"], vocab_size=256))
        expected = sorted(n for n, _ in whole.named_parameters())
        tied = whole.args.tie_embeddings
        assert sorted(n for n in names if not (tied and n == "output.weight")) == expected, name


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
