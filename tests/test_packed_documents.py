"""Packed documents: Megatron's --reset-position-ids / --reset-attention-mask / --eod-mask-loss.

(a) Positions, attention masks and loss masks of real packed samples (EOD-ended documents of an
    indexed dataset, several per sample, one running past the sample's end) equal megatron-core's
    GPTDataset with the same flags (its `_get_ltor_masks_and_position_ids`).
(b) A packed sample of k documents gives each document the logits and the gradients of that
    document run alone (fp32, tests/tolerances.py), single process: RoPE + GQA, sliding window,
    learned positions, ALiBi (dense bias), soft-capped attention.
(c) The same equality under TP2 x CP2 with sequence parallelism over a two-stage cut, TP2 x CP2
    with a sliding window, and a real 1F1B pipeline schedule PP2 x TP2 with sequence parallelism:
    one launch of 4 gloo processes, compared in this process to the documents run alone. The same
    processes run ember's CUDA path (compiled BlockMask, compiled flex_attention) through inductor on
    the CPU under TP2 + SP over a two-stage cut, forward only (flex_attention's backward is
    CUDA-only), as the single-process flex tests next to the BlockMask check do.
(d) `ember train` with the three flags, and a packed fine-tuning run, train end to end.

A mask that lets one document see another, a position not reset, or a CP chunk masked by local
instead of global positions changes logits by O(1e-2), far outside the fp32 bounds.

This file is also the rank worker: `python tests/test_packed_documents.py OUT_DIR`.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import read_metrics, seeded_stages, write_finetune_dataset  # noqa: E402
from dist_utils import single_thread  # noqa: E402, F401 (autouse fixture: one torch thread)
from tolerances import assert_fp32_close, backward_terms, forward_terms, loss_terms, rms  # noqa: E402
from ember.data.documents import (PackedDocuments, add_packed_documents, eod_document_ids,  # noqa: E402
                                  eod_position_ids)
from ember.errors import EmberError  # noqa: E402
from ember.models import Transformer, get_model_args  # noqa: E402
from ember.models.documents import dense_document_mask  # noqa: E402

EOD = 0
SEED = 4321
SEQ = 32
# documents per row of the packed batch; the last one of each row has no EOD: it runs past the end
ROW_DOCUMENTS = [[7, 12, 13], [3, 20, 9]]


def packed_batch(vocab: int, seed: int = SEED) -> dict[str, torch.Tensor]:
    """input_ids/labels [2, SEQ] of EOD-ended documents, with ember's document fields and loss mask."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in ROW_DOCUMENTS:
        assert sum(lengths) == SEQ
        parts = []
        for number, length in enumerate(lengths):
            doc = torch.randint(1, vocab, (length,), generator=generator)
            if number < len(lengths) - 1:
                doc[-1] = EOD
            parts.append(doc)
        parts.append(torch.randint(1, vocab, (1,), generator=generator))  # the last label
        rows.append(torch.cat(parts))
    tokens = torch.stack(rows)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(len(rows), SEQ)}
    return add_packed_documents(batch, PackedDocuments(EOD, True, True, True))


def document_spans(row: int) -> list[tuple[int, int]]:
    ends = np.cumsum(ROW_DOCUMENTS[row]).tolist()
    return list(zip([0] + ends[:-1], ends))


def documents_alone(stages: list[Transformer], batch: dict[str, torch.Tensor]) -> dict:
    """Every document run alone (its own sequence, positions from 0, plain causal attention):
    logits laid out as in the packed batch, and the gradients of the summed losses."""
    logits = torch.zeros(*batch["input_ids"].shape, stages[-1].args.vocab_size)
    total = torch.zeros(())
    for row in range(batch["input_ids"].shape[0]):
        for start, end in document_spans(row):
            hidden = batch["input_ids"][row:row + 1, start:end]
            for stage in stages:
                hidden = stage(hidden)
            losses = F.cross_entropy(hidden[0].float(), batch["labels"][row, start:end], reduction="none")
            total = total + (losses * batch["loss_mask"][row, start:end]).sum()
            logits[row, start:end] = hidden[0].detach()
    total.backward()
    return {"logits": logits, "loss": total.item(),
            "grads": {n: p.grad.clone() for s in stages for n, p in s.named_parameters()}}


def assert_matches_alone(result: dict, reference: dict, args, positions: torch.Tensor | None = None) -> None:
    tokens = int(sum(sum(r) for r in ROW_DOCUMENTS))
    if "logits" in result:
        expected = reference["logits"] if positions is None else reference["logits"][:, positions]
        assert_fp32_close(result["logits"], expected, terms=forward_terms(args, SEQ))
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    grad_terms = backward_terms(loss_terms(args, SEQ, tokens), tokens=tokens)
    grad_scale = rms(*reference["grads"].values())
    for name, grad in result["grads"].items():
        assert_fp32_close(grad, reference["grads"][name], terms=grad_terms, min_scale=grad_scale,
                          msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------ (a) megatron-core semantics


def _write_eod_documents(prefix: Path, count: int, seed: int) -> str:
    from ember.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(str(prefix), np.uint16)
    for _ in range(count):  # what `ember preprocess --append-eod` writes: each document ends with EOD
        writer.add_document(np.append(rng.integers(1, 300, int(rng.integers(2, 30))), EOD))
    writer.finalize()
    return str(prefix)


class _EodTokenizer:
    vocab_size = None
    eod = EOD
    unique_identifiers = {"class": "EodTestTokenizer"}


@pytest.mark.parametrize("flags", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True)])
def test_masks_and_positions_match_megatron(tmp_path, flags):
    pytest.importorskip("megatron.core.datasets.gpt_dataset")
    from megatron.core.datasets import gpt_dataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    from ember.data.blending import build_datasets
    from ember.data.loader import collate

    reset_positions, reset_attention, eod_mask = flags
    prefix = _write_eod_documents(tmp_path / "docs", 300, seed=5)
    seq_length, sizes = 64, [40, 1, 1]
    config = gpt_dataset.GPTDatasetConfig(
        random_seed=7, sequence_length=seq_length, blend=([prefix], None), split="98,1,1", path_to_cache=None,
        tokenizer=_EodTokenizer(), reset_position_ids=reset_positions, reset_attention_mask=reset_attention,
        eod_mask_loss=eod_mask, create_attention_mask=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = BlendedMegatronDatasetBuilder(gpt_dataset.GPTDataset, sizes, lambda: True, config).build()[0]
    ours = build_datasets(prefix, "98,1,1", seq_length, 7, sizes, cache_dir=tmp_path)[0]
    packing = PackedDocuments(EOD, *flags)
    documents_per_sample, spans_end = [], 0
    for index in range(40):
        batch = add_packed_documents(collate([ours[index]]), packing)
        reference = theirs[index]
        assert torch.equal(batch["input_ids"][0], reference["tokens"])
        torch.testing.assert_close(batch["loss_mask"][0], reference["loss_mask"], rtol=0, atol=0)
        positions = batch.get("position_ids", torch.arange(seq_length)[None])[0]
        assert torch.equal(positions, reference["position_ids"])
        documents = batch.get("document_ids", torch.zeros(1, seq_length, dtype=torch.long))
        allowed = dense_document_mask(documents)[0]  # [1, T, T], True = attend
        assert torch.equal(allowed, ~reference["attention_mask"])  # Megatron: True = masked
        documents_per_sample.append(int(eod_document_ids(batch["input_ids"], EOD).max()) + 1)
        spans_end += int(batch["input_ids"][0, -1] != EOD)
    assert max(documents_per_sample) >= 3 and spans_end > 0  # real packing, documents cut at the end


def test_document_fields_of_a_hand_made_row():
    ids = torch.tensor([[5, 6, EOD, 7, EOD, EOD, 8, 9]])
    assert eod_document_ids(ids, EOD).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    assert eod_position_ids(ids, EOD).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_flags_need_the_eod_token():
    with pytest.raises(EmberError, match="--reset-attention-mask need the end-of-document token"):
        PackedDocuments(None, reset_attention_mask=True).check()


# ------------------------------------------------------------------------ (b) single process


SINGLE_CASES = {
    "llama": ("tiny-llama", {}),
    "mistral-window": ("tiny-mistral", {"sliding_window": 8}),
    "gpt2-learned": ("tiny-gpt2", {}),
    "bloom-alibi": ("tiny-bloom", {}),
    "grok1-softcap": ("tiny-grok1", {"attn_logit_softcap": 30.0}),
}


@pytest.mark.parametrize("case", SINGLE_CASES)
def test_packed_sample_equals_documents_alone(case):
    model_name, overrides = SINGLE_CASES[case]
    reference_model = seeded_stages(model_name, overrides, False, SEED)
    model = seeded_stages(model_name, overrides, False, SEED)[0]
    batch = packed_batch(model.args.vocab_size)
    reference = documents_alone(reference_model, batch)
    logits = model(batch["input_ids"], batch["position_ids"], documents=batch["document_ids"])
    loss = (F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
            * batch["loss_mask"].flatten()).sum()
    loss.backward()
    result = {"logits": logits.detach(), "loss": loss.item(),
              "grads": {n: p.grad for n, p in model.named_parameters()}}
    assert_matches_alone(result, reference, model.args)
    # without the documents the packed sample is not its documents alone: the check can fail
    with torch.no_grad():
        crossing = model(batch["input_ids"], batch["position_ids"])
    assert (crossing - reference["logits"]).abs().max() > 1e-3


def test_plain_causal_path_is_unchanged():
    """Flags off: no mask tensor, SDPA's is_causal path; one document is plain causal attention."""
    from ember.models.positions import build_attention_mask

    args = get_model_args("tiny-llama")
    mask = build_attention_mask(args, SEQ, 0, torch.device("cpu"), torch.float32, None)
    assert mask.mask is None and mask.is_causal and mask.documents is None
    model = seeded_stages("tiny-llama", {}, False, SEED)[0]
    ids = packed_batch(args.vocab_size)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, documents=torch.zeros_like(ids)), model(ids), rtol=1e-6, atol=1e-6)


def test_packed_finetuning_examples_are_isolated(tmp_path):
    """A packed fine-tuning sample gives every example the logits it has alone; padded samples hold
    one example each and need no document ids."""
    from ember.data.finetune_dataset import FinetuneDataset
    from ember.data.loader import collate

    prefix = write_finetune_dataset(tmp_path / "sft", examples=12, low=1)
    packed = FinetuneDataset(prefix, SEQ, seed=1, pack=True, pad_id=EOD)
    batch = collate([packed[0], packed[1]])
    model = seeded_stages("tiny-llama", {}, False, SEED)[0]
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], documents=batch["document_ids"])
        examples = 0
        for row in range(2):
            documents = batch["document_ids"][row]
            for number in documents.unique().tolist()[:-1]:  # the last one is the padding
                span = (documents == number).nonzero().flatten()
                start, end = int(span[0]), int(span[-1]) + 1
                assert batch["position_ids"][row, start:end].tolist() == list(range(end - start))
                alone = model(batch["input_ids"][row:row + 1, start:end])
                assert_fp32_close(logits[row:row + 1, start:end], alone, terms=forward_terms(model.args, SEQ))
                examples += 1
    assert examples >= 4  # several examples per sample
    padded = FinetuneDataset(prefix, SEQ, seed=1, pack=False, pad_id=EOD)
    assert "document_ids" not in padded[0] and len(padded) == 12


@pytest.mark.parametrize("window", [None, 8])
def test_block_mask_equals_the_dense_mask(window):
    """The flex_attention BlockMask CUDA uses, checked on the CPU with eager flex_attention."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from ember.models.documents import document_block_mask

    documents = packed_batch(512)["document_ids"]
    generator = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(2, heads, SEQ, 16, generator=generator) for heads in (4, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not the fused kernel
        out = flex.flex_attention(q, k, v, block_mask=document_block_mask(documents, window, compile_mask=False),
                                  enable_gqa=True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_document_mask(documents, window),
                                              enable_gqa=True)
    assert_fp32_close(out, expected, terms=SEQ + 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention is ember's CUDA path")
def test_flex_attention_on_cuda_equals_documents_alone():
    from ember.models.positions import build_attention_mask

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = seeded_stages("tiny-mistral", {"sliding_window": 8}, False, SEED)[0].cuda()
    batch = {k: v.cuda() for k, v in packed_batch(model.args.vocab_size).items()}
    mask = build_attention_mask(model.args, SEQ, 0, batch["input_ids"].device, torch.float32, None,
                                batch["document_ids"])
    assert mask.block_mask is not None and mask.mask is None  # no dense [T, T] mask on CUDA
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], documents=batch["document_ids"])
        for row in range(2):
            for start, end in document_spans(row):
                alone = model(batch["input_ids"][row:row + 1, start:end])
                torch.testing.assert_close(logits[row:row + 1, start:end], alone, rtol=1e-4, atol=1e-4)


def _cpp_compiler() -> bool:
    import shutil

    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """ember's CUDA path on the CPU: the compiled BlockMask and the compiled flex_attention kernel
    (inductor's CPU template), counting the calls that reach the kernel."""
    import ember.models.attention as attention
    import ember.models.documents as documents

    pytest.importorskip("torch.nn.attention.flex_attention")
    if not _cpp_compiler():
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    calls = []
    original = attention.flex_document_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(documents, "flex_attention_applies", lambda device: True)
    monkeypatch.setattr(attention, "flex_document_attention", counted)
    return calls


def test_compiled_flex_path_on_cpu_equals_documents_alone(flex_on_cpu):
    """The code CUDA runs (compiled block mask, compiled flex kernel, GQA, sliding window), run by
    inductor on the CPU: forward only, since flex_attention's backward is CUDA-only in torch."""
    model = seeded_stages("tiny-mistral", {"sliding_window": 8}, False, SEED)[0]
    batch = packed_batch(model.args.vocab_size)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], documents=batch["document_ids"])
        assert len(flex_on_cpu) == model.args.n_layers  # every layer took the kernel
        for row in range(2):
            for start, end in document_spans(row):
                alone = model(batch["input_ids"][row:row + 1, start:end])
                assert_fp32_close(logits[row:row + 1, start:end], alone, terms=forward_terms(model.args, SEQ))


def test_attention_dropout_on_the_flex_path_takes_the_dense_mask(flex_on_cpu):
    """flex_attention has no dropout: with attention dropout in training, packed documents go through
    SDPA with the dense block-diagonal mask, drawing the masks the CPU path draws."""
    overrides = {"sliding_window": 8, "attention_dropout": 0.5}
    model = seeded_stages("tiny-mistral", overrides, False, SEED)[0].train()
    batch = packed_batch(model.args.vocab_size)

    def run():
        torch.manual_seed(SEED)
        return model(batch["input_ids"], batch["position_ids"], documents=batch["document_ids"])

    on_flex_path = run()
    on_flex_path.sum().backward()
    assert not flex_on_cpu
    import ember.models.documents as documents

    documents.flex_attention_applies = lambda device: False  # the monkeypatch restores it
    torch.testing.assert_close(on_flex_path, run(), rtol=0, atol=0)
    with torch.no_grad():
        assert (on_flex_path - model.eval()(batch["input_ids"], batch["position_ids"],
                                            documents=batch["document_ids"])).abs().max() > 1e-3


# ------------------------------------------------------------------------ (c) parallel layouts

# id -> (model, overrides, layout); every layout runs on 4 ranks
PARALLEL_CASES = {
    "tp2-sp-cp2-balanced-stages": ("tiny-llama", {}, "tp-cp-stages"),
    "tp2-cp2-window": ("tiny-mistral", {"sliding_window": 8}, "tp-cp"),
    "pp2-tp2-sp-1f1b": ("tiny-llama", {}, "pp-tp"),
}


def _grad_tensor(grad):
    return grad.to_local() if hasattr(grad, "to_local") else grad


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _tp_cp_case(model_name: str, overrides: dict, tp_mesh, cp_mesh, load_balance: bool, cut: bool,
                sequence_parallel: bool) -> dict:
    import torch.distributed as dist

    from ember.parallel.context import apply_context_parallel, shard_sequence
    from ember.parallel.loss import cross_entropy_sum
    from ember.parallel.tensor import apply_tensor_parallel

    stages = seeded_stages(model_name, overrides, cut, SEED)
    for stage in stages:
        apply_tensor_parallel(stage, tp_mesh, sequence_parallel=sequence_parallel, loss_parallel=True)
        apply_context_parallel(stage, cp_mesh, load_balance=load_balance)
    batch = packed_batch(stages[0].args.vocab_size)
    local = {k: shard_sequence(v, cp_mesh, load_balance=load_balance) for k, v in batch.items()}
    hidden = local["input_ids"]
    for stage in stages:  # positions and document ids go to every stage, as the pipeline passes them
        hidden = stage(hidden, local["position_ids"], documents=local["document_ids"])
    loss = cross_entropy_sum(hidden, local["labels"], local["loss_mask"])
    loss.backward()
    for stage in stages:  # data parallelism over the cp dimension sums gradients and losses
        for param in stage.parameters():
            dist.all_reduce(_grad_tensor(param.grad), group=cp_mesh.get_group())
    total = loss.detach().clone()
    dist.all_reduce(total, group=cp_mesh.get_group())
    return {"logits": _full(hidden).detach(), "loss": total.item(), "cp_rank": cp_mesh.get_local_rank(),
            "load_balance": load_balance,
            "grads": {n: _full(p.grad).detach() for s in stages for n, p in s.named_parameters()}}


def _pp_tp_case(model_name: str, overrides: dict, pp_mesh, tp_mesh) -> dict:
    from ember.parallel.pipeline import build_pipeline_stages, build_schedule, pipeline_train_step
    from ember.parallel.tensor import apply_tensor_parallel

    whole = seeded_stages(model_name, overrides, False, SEED)[0]
    parts = build_pipeline_stages(whole, pp_mesh)
    for module in parts.modules:
        apply_tensor_parallel(module, tp_mesh, sequence_parallel=True, loss_parallel=True)
    pipeline = build_schedule(parts, "1f1b", n_microbatches=2)
    batch = packed_batch(whole.args.vocab_size)
    loss = pipeline_train_step(pipeline, batch["input_ids"], batch["labels"], batch["loss_mask"], num_tokens=1.0,
                               broadcast_loss=True, positions=batch["position_ids"], documents=batch["document_ids"])
    return {"loss": float(loss), "grads": {n: _full(p.grad).detach() for n, p in parts.named_parameters()}}


# the CUDA path under tensor and sequence parallelism over a two-stage cut, forward only
FLEX_CASE = ("tiny-mistral", {"sliding_window": 8})


def _flex_tp_sp_case(tp_mesh) -> dict:
    """ember's CUDA path (compiled BlockMask built per stage over the whole sequence, compiled
    flex_attention on this rank's heads) run by inductor on the CPU under TP2 + SP, each stage of a
    two-stage cut in turn; forward only: flex_attention's backward is CUDA-only."""
    import ember.models.attention as attention
    import ember.models.documents as documents
    from ember.parallel.tensor import apply_tensor_parallel

    if not _cpp_compiler():
        return {"skipped": "torch.compile on the CPU needs a C++ compiler"}
    heads = []
    applies, kernel = documents.flex_attention_applies, attention.flex_document_attention

    def counted(*args, **kwargs):
        heads.append(args[0].shape[1])
        return kernel(*args, **kwargs)

    documents.flex_attention_applies, attention.flex_document_attention = (lambda device: True), counted
    try:
        stages = seeded_stages(*FLEX_CASE, True, SEED)
        for stage in stages:
            apply_tensor_parallel(stage, tp_mesh, sequence_parallel=True, loss_parallel=True)
        batch = packed_batch(stages[0].args.vocab_size)
        hidden = batch["input_ids"]
        with torch.no_grad():
            for stage in stages:
                hidden = stage(hidden, batch["position_ids"], documents=batch["document_ids"])
    finally:
        documents.flex_attention_applies, attention.flex_document_attention = applies, kernel
    return {"logits": _full(hidden).detach(), "heads": heads}


def rank_main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cp_tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "tp"))
    pp_tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    for case, (model_name, overrides, layout) in PARALLEL_CASES.items():
        if layout == "pp-tp":
            result = _pp_tp_case(model_name, overrides, pp_tp["pp"], pp_tp["tp"])
        else:
            stages_cut = layout == "tp-cp-stages"
            result = _tp_cp_case(model_name, overrides, cp_tp["tp"], cp_tp["cp"], load_balance=stages_cut,
                                 cut=stages_cut, sequence_parallel=stages_cut)
        torch.save(result, os.path.join(out_dir, f"{case}-rank{rank}.pt"))
    torch.save(_flex_tp_sp_case(cp_tp["tp"]), os.path.join(out_dir, f"flex-rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    from dist_utils import run_ranks

    out_dir = tmp_path_factory.mktemp("packed-parallel")
    result = run_ranks([__file__, str(out_dir)], nprocs=4, timeout=240)
    assert result.returncode == 0, result.output[-6000:]
    return {case: [torch.load(out_dir / f"{case}-rank{r}.pt", weights_only=True) for r in range(4)]
            for case in (*PARALLEL_CASES, "flex")}


def _cp_positions(rank: int, load_balance: bool) -> torch.Tensor:
    """The global positions CP rank `rank` of 2 holds, written out independently of ember."""
    if not load_balance:
        return torch.arange(rank * SEQ // 2, (rank + 1) * SEQ // 2)
    quarter = SEQ // 4
    return torch.cat([torch.arange(c * quarter, (c + 1) * quarter) for c in (rank, 3 - rank)])


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("case", PARALLEL_CASES)
def test_parallel_layouts_equal_documents_alone(parallel_results, case):
    model_name, overrides, layout = PARALLEL_CASES[case]
    reference = documents_alone(seeded_stages(model_name, overrides, layout == "tp-cp-stages", SEED),
                                packed_batch(get_model_args(model_name, **overrides).vocab_size))
    args = get_model_args(model_name, **overrides)
    ranks = parallel_results[case]
    if layout == "pp-tp":
        grads = {}
        for result in ranks:  # each pipeline rank holds its stage's parameters
            grads.update(result["grads"])
        assert set(grads) == set(reference["grads"])
        assert_matches_alone({"loss": ranks[0]["loss"], "grads": grads}, reference, args)
        return
    for result in ranks:
        assert_matches_alone(result, reference, args, _cp_positions(result["cp_rank"], result["load_balance"]))


@pytest.mark.slow  # starts processes: see tests/conftest.py
def test_compiled_flex_path_under_tensor_and_sequence_parallelism(parallel_results):
    ranks = parallel_results["flex"]
    if "skipped" in ranks[0]:
        pytest.skip(ranks[0]["skipped"])
    args = get_model_args(FLEX_CASE[0], **FLEX_CASE[1])
    reference = documents_alone(seeded_stages(*FLEX_CASE, True, SEED), packed_batch(args.vocab_size))
    for result in ranks:
        # every layer of both stages took the kernel, on this rank's half of the heads
        assert result["heads"] == [args.n_heads // 2] * args.n_layers
        assert_fp32_close(result["logits"], reference["logits"], terms=forward_terms(args, SEQ))


# ------------------------------------------------------------------------ (d) end to end


def _ember_train(tmp_path: Path, *extra: str) -> dict[int, dict]:
    """`ember train` (in this process: the command end to end, without a new interpreter)."""
    from ember.cli import main
    from ember.compat.tiny_assets import prepare

    argv = ["train", "--model", "tiny-llama", "--tokenizer-name-or-path", str(prepare().tokenizer),
            "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
            "--log-interval", "1", "--eval-iters", "0", "--output-dir", str(tmp_path / "out"), "--no-tensorboard",
            "--cpu-threads", "1", *extra]
    assert main(argv) == 0
    return read_metrics(tmp_path / "out")[0]


@pytest.mark.slow  # trains: see tests/conftest.py
def test_ember_train_with_the_megatron_flags(tmp_path):
    data = _write_eod_documents(tmp_path / "docs", 200, seed=9)  # several documents per sample
    train = _ember_train(tmp_path, "--data-path", data, "--train-iters", "3",
                         "--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss")
    assert sorted(train) == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in train.values()), train


@pytest.mark.slow  # trains: see tests/conftest.py
def test_packed_finetuning_trains(tmp_path):
    prefix = write_finetune_dataset(tmp_path / "sft", low=1)  # several examples per sample
    train = _ember_train(tmp_path, "--train-data-path", prefix, "--train-iters", "2", "--finetune-packing", "packed")
    assert sorted(train) == [1, 2] and all(np.isfinite(r["loss"]) for r in train.values()), train


def test_finetune_packing_choice():
    from ember.config import Config
    from ember.data.documents import finetune_pack

    data = Config().data
    assert not finetune_pack(data)  # PAI: one example per sample
    data.reset_attention_mask = True
    assert finetune_pack(data)  # MindSpeed: packed, each example isolated
    data.finetune_packing = "padded"
    assert not finetune_pack(data)
    data.finetune_packing = "stacked"
    with pytest.raises(EmberError, match="--finetune-packing 'stacked'"):
        finetune_pack(data)


if __name__ == "__main__":
    rank_main(sys.argv[1])
