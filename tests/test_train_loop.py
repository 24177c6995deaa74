"""The training loop in one process: fine-tune masking, blends, recomputation, precisions, NaN/Inf
steps, starting from converted weights."""

import copy
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_utils import single_thread  # noqa: F401 (autouse fixture: one torch thread)
from dist_utils import read_metrics, train_config, write_finetune_dataset, write_token_dataset
from ember.checkpoint.training import find_checkpoint, load_training_state
from ember.errors import EmberError
from ember.models import Transformer, get_model_args
from ember.parallel.recompute import apply_recompute
from ember.train import Trainer, run_training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens", seed=2)


def _argv(data, out, *extra, iters=4):
    length = ["--train-iters", str(iters)] if iters else []
    return ["--model", "tiny-llama", "--vocab-size", "512", "--data-path", str(data), "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", *length, "--lr", "2e-3",
            "--log-interval", "1", "--eval-iters", "0", "--output-dir", str(out), "--no-tensorboard", *extra]


def _trainer(argv):
    return Trainer(train_config(argv), stream=io.StringIO()).setup()


def _plain_state(model):
    return {k.replace("._checkpoint_wrapped_module", ""): v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- fine-tuning data


def test_finetune_loss_counts_only_response_tokens(tmp_path):
    """The logged loss of iteration 1 is the token-level mean cross-entropy over the response tokens
    of the whole global batch (Hugging Face's ignore_index=-100 mean), though the two micro-batches
    hold different numbers of them."""
    prefix = write_finetune_dataset(tmp_path / "sft")
    trainer = _trainer(_argv(prefix, tmp_path, "--split", "100,0,0", iters=1))
    initial = copy.deepcopy(_plain_state(trainer.model))
    batch = [trainer.train_ds[i] for i in range(4)]  # global batch 1 = samples 0..3
    result = trainer.train()
    trainer.close()

    model = Transformer(trainer.model_args)
    model.load_state_dict(initial)
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in batch]))
    labels = torch.from_numpy(np.stack([s["labels"] for s in batch]))
    mask = torch.from_numpy(np.stack([s["loss_mask"] for s in batch]))
    targets = torch.where(mask > 0, labels, torch.full_like(labels, -100))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    unmasked = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    per_micro = [mask[:2].sum().item(), mask[2:].sum().item()]
    assert per_micro[0] != per_micro[1]  # unequal micro-batches: a mean of means would differ
    assert 0 < mask.sum() < mask.numel()
    assert result.losses[1] == pytest.approx(expected.item(), rel=1e-6)
    assert abs(result.losses[1] - unmasked.item()) > 1e-4


def test_finetune_epochs_set_the_iterations(tmp_path):
    prefix = write_finetune_dataset(tmp_path / "sft", examples=30)
    trainer = _trainer(_argv(prefix, tmp_path, "--split", "100,0,0", "--train-epochs", "2", iters=None))
    assert trainer.train_iters == len(trainer.train_ds) // 4 > 0
    trainer.close()


# --------------------------------------------------------------------------- blends


def test_blend_weights_reach_the_batches(tmp_path):
    """--data-path "0.3 A 0.7 B": the samples the loop trains on come from A and B in proportion 3:7
    at every prefix of the run (Megatron's greedy blend), A's tokens being < 250 and B's >= 250."""
    a = write_token_dataset(tmp_path / "a", documents=200, vocab=250, seed=4)
    b = write_token_dataset(tmp_path / "b", documents=200, vocab=250, seed=5, low=250)
    trainer = _trainer(_argv(f"0.3 {a} 0.7 {b}", tmp_path, iters=20))
    from_a = 0
    for n in range(1, 81):
        batch = next(trainer.train_batches)  # micro-batches of 2, in order
        for row in batch["input_ids"]:
            assert bool((row < 250).all()) or bool((row >= 250).all())  # one dataset per sample
        from_a += int(sum(bool((row < 250).all()) for row in batch["input_ids"]))
        assert abs(from_a - 0.3 * 2 * n) <= 1.0, n
    trainer.close()


# --------------------------------------------------------------------------- recomputation


@pytest.mark.parametrize("granularity, method, layers, wrapped", [
    ("full", None, None, [True, True]),
    ("full", "block", 1, [True, False]),
    ("selective", None, None, [True, True]),
])
def test_recompute_keeps_losses_and_gradients(granularity, method, layers, wrapped):
    args = get_model_args("tiny-llama")
    reference = Transformer(args)
    reference.init_weights(seed=0)
    model = copy.deepcopy(reference)
    apply_recompute(model, granularity, method, layers)
    assert [type(b).__name__ == "CheckpointWrapper" for b in model.layers.values()] == wrapped
    assert set(model.state_dict()) == set(reference.state_dict())  # checkpoints do not change
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    for m in (reference, model):
        F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    grads = {k.replace("._checkpoint_wrapped_module", ""): p.grad for k, p in model.named_parameters()}
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-6, atol=1e-7)


def test_recompute_run_resumes_from_a_plain_runs_checkpoint(data, tmp_path):
    """Parameter names in checkpoints do not depend on recomputation."""
    plain = run_training(train_config(_argv(data, tmp_path / "a", "--save", str(tmp_path / "ckpt"), iters=2)))
    assert plain.iteration == 2
    trainer = _trainer(_argv(data, tmp_path / "b", "--recompute-granularity", "full", "--load",
                             str(tmp_path / "ckpt")))
    assert trainer.state.iteration == 2
    trainer.close()


# --------------------------------------------------------------------------- precisions


def test_bf16_and_fp16_train_near_fp32(data, tmp_path):
    losses = {}
    flags = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16", "--initial-loss-scale", "1024"]}  # no overflow
    for precision, flag in flags.items():
        result = run_training(train_config(_argv(data, tmp_path / precision, *flag, iters=3)), stream=io.StringIO())
        losses[precision] = [result.losses[i] for i in (1, 2, 3)]
        assert read_metrics(tmp_path / precision)[0][3]["skipped_iterations"] == 0, precision
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    assert losses["fp16"] == pytest.approx(losses["fp32"], rel=5e-3)
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in 16 bits


def test_fp16_overflow_lowers_the_scale_and_skips(data, tmp_path):
    result = run_training(train_config(_argv(data, tmp_path, "--fp16", "--initial-loss-scale", str(2.0**40),
                                             "--max-consecutive-skips", "3", iters=6)), stream=io.StringIO())
    train, _ = read_metrics(tmp_path)
    assert result.iteration == 6  # overflows while the scale can still drop are not failures
    scales = [train[i]["loss_scale"] for i in range(1, 7)]
    # Megatron's hysteresis 2: the first overflow leaves the scale, every later one halves it
    assert scales == [2.0**40] + [2.0**(41 - i) for i in range(2, 7)]
    assert train[6]["skipped_iterations"] == 6 and train[1]["grad_norm"] is None


# --------------------------------------------------------------------------- NaN / Inf steps


def _poison_gradients(trainer, iterations):
    def hook(grad):
        return grad * float("nan") if trainer.state.iteration in iterations else grad
    trainer.model.norm.weight.register_hook(hook)


def test_a_nan_step_is_skipped_and_counted(data, tmp_path):
    trainer = _trainer(_argv(data, tmp_path, iters=4))
    _poison_gradients(trainer, {2})
    snapshots = {}

    original_step = trainer.train_step

    def recording_step(micro_batches):
        out = original_step(micro_batches)
        snapshots[trainer.state.iteration] = (_plain_state(trainer.model),
                                              copy.deepcopy(trainer.optimizer.state_dict()["state"]))
        return out

    trainer.train_step = recording_step
    result = trainer.train()
    trainer.close()
    for name, value in snapshots[1][0].items():
        assert torch.equal(value, snapshots[2][0][name]), name  # iteration 2 changed nothing
    for key, values in snapshots[1][1].items():
        assert all(torch.equal(v, snapshots[2][1][key][k]) for k, v in values.items())
    assert not torch.equal(snapshots[2][0]["norm.weight"], snapshots[3][0]["norm.weight"])  # 3 stepped
    train, _ = read_metrics(tmp_path)
    assert [train[i]["skipped_iterations"] for i in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert train[2]["grad_norm"] is None and result.iteration == 4


def test_nan_steps_in_a_row_stop_with_the_last_good_state_saved(data, tmp_path):
    save = tmp_path / "ckpt"
    trainer = _trainer(_argv(data, tmp_path, "--save", str(save), "--max-consecutive-skips", "3", iters=10))
    _poison_gradients(trainer, set(range(3, 11)))
    good = {}
    original_step = trainer.train_step

    def recording_step(micro_batches):
        out = original_step(micro_batches)
        if trainer.state.iteration == 2:
            good.update(_plain_state(trainer.model))
        return out

    trainer.train_step = recording_step
    with pytest.raises(EmberError, match="3 iterations in a row had a NaN/Inf") as info:
        trainer.train()
    trainer.close()
    assert "\n" not in str(info.value) and str(save) in str(info.value)
    ref = find_checkpoint(save)
    assert ref.iteration == 5
    assert ref.train_state()["state"]["skipped_iterations"] == 3
    fresh = _trainer(_argv(data, tmp_path / "fresh"))
    load_training_state(ref, fresh.model, None)
    for name, value in _plain_state(fresh.model).items():
        assert torch.equal(value, good[name]), name
    fresh.close()


# --------------------------------------------------------------------------- converted weights


@pytest.mark.parametrize("finetune", [True, False])
def test_load_converted_weights_starts_fresh_from_them(data, tmp_path, finetune):
    """`--load CONVERTED --finetune` (or a converted folder without training state): those weights,
    a fresh optimizer, iteration 0 — continued pretraining and SFT as in the seeds."""
    from ember.checkpoint.weights import save_ember_weights

    args = get_model_args("tiny-qwen3", vocab_size=512)  # tied embeddings: stored once
    source = Transformer(args)
    source.init_weights(seed=123)
    # small files: the weights reach the model one file at a time
    folder = save_ember_weights(source, args, tmp_path / "converted", family="qwen3", max_shard_bytes=40_000)
    assert len(list(folder.glob("*.safetensors"))) > 3
    argv = [a for a in _argv(data, tmp_path, "--load", str(folder)) if a not in ("--model", "tiny-llama")]
    trainer = _trainer(argv + (["--finetune"] if finetune else []))
    assert trainer.model_args.to_dict() == args.to_dict()
    assert trainer.model.output.weight is trainer.model.tok_embeddings.weight  # still one matrix
    for name, value in _plain_state(trainer.model).items():
        torch.testing.assert_close(value, source.state_dict()[name], rtol=0, atol=0)
    assert trainer.state.iteration == 0 and not trainer.optimizer.state
    result = trainer.train()
    trainer.close()
    assert result.iteration == 4
    assert torch.equal(trainer.model.output.weight, trainer.model.tok_embeddings.weight)
    first = json.loads((tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["iteration"] == 1


def test_a_relaunched_finetune_continues_from_its_own_checkpoint(data, tmp_path):
    """The same `--load CONVERTED --finetune --save OUT` command run again after a stop resumes from
    OUT (what a preempted job needs) instead of starting over from the converted weights."""
    from ember.checkpoint.weights import save_ember_weights

    args = get_model_args("tiny-llama", vocab_size=512)
    source = Transformer(args)
    source.init_weights(seed=5)
    folder = save_ember_weights(source, args, tmp_path / "converted", family="llama")
    argv = _argv(data, tmp_path, "--load", str(folder), "--finetune", "--save", str(tmp_path / "out"), iters=4)
    first = run_training(train_config(argv + ["--exit-interval", "2"]), stream=io.StringIO())
    assert (first.iteration, first.reason) == (2, "exit_interval")
    again = _trainer(argv)
    assert again.state.iteration == 2 and again.optimizer.state
    assert again.train().iteration == 4
    again.close()


# --------------------------------------------------------------------------- evaluation


def test_each_validation_takes_the_next_samples_then_the_test_split(tmp_path, data):
    """Megatron's evaluation: every validation continues through the validation split where the
    previous one stopped (the split is sized for each evaluation plus a final one after training),
    then the test split once. With lr 0 the weights stay at their start, so the logged losses must be
    the plain cross-entropy of those weights over exactly those samples."""
    out = tmp_path / "out"
    argv = _argv(data, out, "--eval-interval", "2", "--eval-iters", "1", "--split", "60,30,10", iters=4)
    argv[argv.index("--lr") + 1] = "0"
    trainer = _trainer(argv)
    try:
        start = _plain_state(trainer.model)
        trainer.train()
        valid, test = trainer.valid_ds, trainer.test_ds
    finally:
        trainer.close()
    model = Transformer(trainer.model_args)
    model.load_state_dict(start)
    model.eval()

    def mean_loss(dataset, first, count=4):
        sequences = torch.stack([torch.as_tensor(dataset[i]["tokens"].astype(np.int64))
                                 for i in range(first, first + count)])  # seq-length + 1 tokens each
        with torch.no_grad():
            logits = model(sequences[:, :-1])
        return float(F.cross_entropy(logits.flatten(0, 1).float(), sequences[:, 1:].flatten()))

    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["iteration"], r["eval_loss"]) for r in records if "eval_loss" in r]
    tests = [(r["iteration"], r["test_loss"]) for r in records if "test_loss" in r]
    assert [it for it, _ in evals] == [2, 4, 4]  # at iterations 2 and 4, then once more after training
    for k, (_, loss) in enumerate(evals):
        assert loss == pytest.approx(mean_loss(valid, 4 * k), rel=1e-5), k
    assert len({loss for _, loss in evals}) == 3  # three different batches
    assert tests == [(4, pytest.approx(mean_loss(test, 0), rel=1e-5))]


def test_fp16_skipped_steps_do_not_advance_the_lr_schedule(data, tmp_path):
    """Megatron steps its LR scheduler only after a successful update: with the first fp16 steps
    skipped (loss scale too high), step k gets the schedule's lr for k minus the skips before it."""
    from ember.train.schedule import build_schedule

    argv = _argv(data, tmp_path, "--fp16", "--initial-loss-scale", str(2.0**24), "--lr-warmup-iters", "2",
                 "--lr-decay-style", "linear", "--min-lr", "1e-4", iters=8)
    config = train_config(argv)
    run_training(config, stream=io.StringIO())
    train, _ = read_metrics(tmp_path)
    skipped = [0] + [train[i]["skipped_iterations"] for i in range(1, 9)]  # skipped[k]: after step k
    assert 1 <= skipped[8] <= 5, skipped  # some skips while the scale comes down, then updates
    schedule = build_schedule(config, 8)
    for k in range(1, 9):
        assert train[k]["lr"] == pytest.approx(schedule.lr_at(schedule.progress_of(k - skipped[k - 1], 0))), k
    first_update = skipped[8] + 1
    assert skipped[first_update] == skipped[first_update - 1]  # the skips came first
    assert train[first_update]["lr"] == pytest.approx(schedule.lr_at(1))  # warm-up's first lr


# --------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-mixtral", "tiny-grok1", "tiny-bloom", "tiny-gpt2"])
def test_initial_weights_come_part_by_part_with_init_weights_values(name):
    """The trainer's initialisation, one part at a time, is Transformer.init_weights(seed) value
    for value (same draws, same order; tied output included), and no part holds more than one
    layer or embedding."""
    from ember.models.initialization import initial_weight_chunks

    args = get_model_args(name, n_layers=3)
    reference = Transformer(args)
    reference.init_weights(seed=77)
    expected = reference.state_dict()
    chunks = list(initial_weight_chunks(args, 77))
    got = {k: v for chunk in chunks for k, v in chunk.items()}
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    layer_chunks = [chunk for chunk in chunks if any(k.startswith("layers.") for k in chunk)]
    assert len(layer_chunks) == 3
    assert all(len({k.split(".")[1] for k in chunk}) == 1 for chunk in layer_chunks)
