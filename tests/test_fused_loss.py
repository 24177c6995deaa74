"""Fused kernels of the training step against their plain PyTorch definitions: the output layer +
cross-entropy of ember.train.fused_loss (loss and gradients, fp32 and bf16, one process, data
parallel on gloo, a whole Trainer run), and the hand-written RoPE and RMSNorm autograd functions
of ember.models (gradcheck in float64)."""

import io
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dist_utils import single_thread  # noqa: F401 (autouse fixture: one torch thread)
from dist_utils import run_ranks, train_config, write_token_dataset
from ember.models import Transformer, get_model_args
from ember.models.norms import RMSNorm, _RMSNormFunction
from ember.models.positions import _RotateHalf, apply_rope
from ember.train import Trainer
from ember.train.fused_loss import fused_loss_applies, linear_cross_entropy_sum, lm_loss_sum


def _reference_loss(hidden, weight, labels, mask):
    """Masked summed cross-entropy from materialised logits, with torch's own F.cross_entropy."""
    logits = F.linear(hidden, weight).float()
    losses = F.cross_entropy(logits.flatten(0, -2), labels.flatten().clamp(min=0), reduction="none")
    return (losses * mask.flatten()).sum()


def _batch(rows=150, vocab=97, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g).requires_grad_()
    weight = torch.randn(vocab, dim, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g)
    mask = (torch.rand(rows, generator=g) > 0.2).float()
    labels[3], mask[3] = -100, 0.0  # padding: outside the vocabulary, masked out
    return hidden, weight, labels, mask


@pytest.mark.parametrize("chunk_rows", [7, 64, 10_000])  # uneven blocks, several, one block
def test_loss_and_gradients_match_the_logits_path(chunk_rows):
    hidden, weight, labels, mask = _batch()
    expected = _reference_loss(hidden, weight, labels, mask)
    grads_expected = torch.autograd.grad(expected * 0.37, (hidden, weight))
    loss = linear_cross_entropy_sum(hidden, weight, labels, mask, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(loss * 0.37, (hidden, weight))  # a scaled objective, as the trainer's
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)
    for got, want in zip(grads, grads_expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_agrees_with_the_logits_path_to_bf16_precision():
    hidden, weight, labels, mask = _batch(rows=200, vocab=300, dim=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference_loss(hidden, weight, labels, mask)
        loss = linear_cross_entropy_sum(hidden, weight, labels, mask, chunk_rows=48)
    grads_expected = torch.autograd.grad(expected, (hidden, weight))
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=0)
    for got, want in zip(grads, grads_expected):
        assert got.dtype == torch.float32
        assert (got - want).norm() <= 1e-2 * want.norm()


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, labels, mask = _batch()
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden, weight, labels, mask, chunk_rows=32)
        expected = _reference_loss(hidden, weight, labels, mask)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-grok1"])  # untied; tied; output multiplier
def test_model_loss_through_the_fused_head_matches_the_logits(name):
    args = get_model_args(name, vocab_size=120)
    torch.manual_seed(0)
    model = Transformer(args)
    assert fused_loss_applies(model)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 120, (2, 24), generator=g)
    labels = torch.randint(0, 120, (2, 24), generator=g)
    mask = (torch.rand(2, 24, generator=g) > 0.3).float()
    params = [p for p in model.parameters() if p.requires_grad]

    logits = model(tokens)
    expected = (F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none") * mask.flatten()).sum()
    grads_expected = torch.autograd.grad(expected, params)
    loss = lm_loss_sum(model, tokens, labels, mask, chunk_rows=10)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)
    for got, want in zip(grads, grads_expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_models_the_fused_head_cannot_take_use_the_logits():
    model = Transformer(get_model_args("tiny-llama", vocab_size=64))
    model.tensor_parallel_mesh = object()  # what apply_tensor_parallel records: vocabulary-sharded logits
    assert not fused_loss_applies(model)
    stage = Transformer(get_model_args("tiny-llama", vocab_size=64))
    stage.output = None  # a pipeline stage before the last
    assert not fused_loss_applies(stage)
    assert not fused_loss_applies(torch.nn.Linear(4, 4))


_DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from ember.models import Transformer, get_model_args
    from ember.parallel.fsdp import apply_data_parallel
    from ember.parallel.loss import cross_entropy_sum
    from ember.train import fused_loss

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    calls = []
    original = fused_loss.linear_cross_entropy_sum
    fused_loss.linear_cross_entropy_sum = lambda *a, **k: calls.append(1) or original(*a, **k)
    g = torch.Generator().manual_seed(rank)
    tokens, labels = torch.randint(0, 96, (2, 16), generator=g), torch.randint(0, 96, (2, 16), generator=g)
    mask = torch.ones(2, 16)
    for mode, shape in (("replicate", (2, 1)), ("fsdp", (1, 2))):
        torch.manual_seed(0)
        model = Transformer(get_model_args("tiny-llama", vocab_size=96))
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp_replicate", "dp_shard"))
        apply_data_parallel(model, mesh, mode, overlap=False)
        results = []
        for loss_fn in (lambda: cross_entropy_sum(model(tokens), labels, mask),
                        lambda: fused_loss.lm_loss_sum(model, tokens, labels, mask, chunk_rows=8)):
            for p in model.parameters():
                p.grad = None
            loss = loss_fn()
            loss.backward()
            results.append((loss.detach(), [p.grad.full_tensor() for p in model.parameters()]))
        (plain, plain_grads), (fused, fused_grads) = results
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
        for got, want in zip(fused_grads, plain_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert calls, f"{mode}: the fused path was not taken"
        calls.clear()
    print("rank", rank, "ok")
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_data_parallel_takes_the_fused_path_with_the_same_gradients():
    """FSDP gathers the output weight for the model's forward, where the fused head runs; its
    gradient then reaches FSDP's reduction like any other (replicate and full-shard modes)."""
    result = run_ranks(["-c", _DATA_PARALLEL_SCRIPT], nprocs=2, timeout=180)
    assert result.returncode == 0, result.output[-3000:]
    assert all("ok" in out for out in result.outputs)


def test_a_trainer_with_the_fused_loss_trains_like_the_plain_one(tmp_path):
    """The trainer's loss (through lm_loss_sum) against cross_entropy_sum of the full logits:
    same losses over a few steps of the real training step (clipping, fused AdamW, accumulation)."""
    from ember.parallel.loss import cross_entropy_sum
    from ember.train.precision import autocast

    data = write_token_dataset(tmp_path / "tokens", seed=4)
    argv = ["--model", "tiny-llama", "--vocab-size", "512", "--data-path", str(data), "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "3e-3",
            "--log-interval", "1", "--eval-iters", "0", "--output-dir", str(tmp_path / "out"), "--no-tensorboard"]
    losses = {}
    for name in ("plain", "fused"):
        trainer = Trainer(train_config(argv), stream=io.StringIO()).setup()

        def plain_loss_sum(batch, trainer=trainer):
            with autocast(trainer.config.train.precision, trainer.device):
                return cross_entropy_sum(trainer.model(batch["input_ids"]), batch["labels"], batch["loss_mask"])

        if name == "plain":
            trainer._loss_sum = plain_loss_sum
        else:
            assert fused_loss_applies(trainer.model)
        try:
            losses[name] = trainer.train().losses
        finally:
            trainer.close()
    assert sorted(losses["fused"]) == [1, 2, 3]
    for iteration, loss in losses["plain"].items():
        assert losses["fused"][iteration] == pytest.approx(loss, rel=1e-5)


# ------------------------------------------------------------------------ fused model ops


def test_rotate_half_function_gradcheck_and_composite_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, generator=g).requires_grad_()
    cos = torch.randn(1, 5, 1, 8, dtype=torch.float64, generator=g)  # arbitrary tables: halves differ
    sin = torch.randn(1, 5, 1, 8, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda t: _RotateHalf.apply(t, cos, sin), (x,))
    composite = x * cos + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin
    torch.testing.assert_close(apply_rope(x, cos, sin), composite)


def test_rmsnorm_function_gradcheck_and_composite_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g).requires_grad_()
    weight = torch.randn(8, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-5), (x, weight))
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(weight.float())
    x32 = x.detach().float().requires_grad_()
    out = norm(x32)
    assert out.grad_fn is not None and "RMSNorm" in type(out.grad_fn).__name__  # the fp32 fast path
    composite = norm.weight * F.rms_norm(x32, (8,), eps=1e-5)
    torch.testing.assert_close(out, composite)
    upstream = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (x32, norm.weight), upstream)
    want = torch.autograd.grad(composite, (x32, norm.weight), upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the residual stream stays fp32, so does the norm
        autocast_out = norm(x32)
    assert autocast_out.dtype == torch.float32
    torch.testing.assert_close(autocast_out, composite)


def test_rotate_half_under_autocast_promotes_like_the_composite_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g).bfloat16().requires_grad_()
    cos, sin = torch.randn(1, 5, 1, 8, generator=g), torch.randn(1, 5, 1, 8, generator=g)
    out = apply_rope(x, cos, sin)
    composite = x * cos + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin
    assert out.dtype == composite.dtype == torch.float32
    torch.testing.assert_close(out, composite)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.dtype == torch.bfloat16


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
