"""`ember eval` against independent references, on one set of tiny random weights:

- lm-eval's own Hugging Face model class (`hf`, loading the saved transformers folder) gives the
  same per-request loglikelihoods (tight tolerance), the same generated text and the same task
  accuracies as ember's lm-eval model class, on a local multiple-choice task, a generation task
  and a rolling-loglikelihood task built here (JSONL files + task YAML, offline);
- perplexity on raw JSONL and on the indexed dataset `ember preprocess` writes from it equals a
  direct transformers computation over the same windows.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("lm_eval")

from ember.cli import main  # noqa: E402
from ember.errors import EmberError  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the cat sat on a mat red blue green one two three four five big small dog ran fast "
         "slow house tree bird sky sun moon water fire yes no answer question").split()
MAX_LENGTH = 48  # small enough that rolling windows and left truncation are exercised


def _tokenizer(folder) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 10 + ["Question: Answer: Q: A:\n"] * 10, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def _write_tasks(folder):
    rng = torch.Generator().manual_seed(3)

    def pick(n):
        return [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=rng)]

    mc = [{"question": " ".join(pick(6)), "choices": [" ".join(pick(2)) for _ in range(3)],
           "label": int(torch.randint(0, 3, (1,), generator=rng))} for _ in range(8)]
    gen = [{"q": " ".join(pick(5)), "a": pick(1)[0]} for _ in range(6)]
    rolling = [{"text": " ".join(pick(int(n))) + "."} for n in (30, 8, 55)]
    for name, rows in (("mc", mc), ("gen", gen), ("rolling", rolling)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def data(name):
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\ntest_split: test\n"

    (folder / "mc.yaml").write_text(
        "task: ember_test_mc\n" + data("mc") + "fewshot_split: test\nnum_fewshot: 1\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{label}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "gen.yaml").write_text(
        "task: ember_test_gen\n" + data("gen") + "output_type: generate_until\n"
        "doc_to_text: \"Q: {{q}}\\nA:\"\ndoc_to_target: \" {{a}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (folder / "rolling.yaml").write_text(
        "task: ember_test_rolling\n" + data("rolling") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random Llama (weights well away from init, so greedy paths are not flat) saved as a
    transformers folder with its tokenizer, converted to ember; the local tasks; lm-eval's `hf`
    results on them (the reference)."""
    root = tmp_path_factory.mktemp("eval")
    tok = _tokenizer(root / "hf")
    eos = tok.eos_token_id
    torch.manual_seed(0)
    vocab = -(-len(tok) // 8) * 8  # padded, as released models are; tensor parallelism splits it evenly
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    hf_model.save_pretrained(root / "hf")
    assert main(["convert", "--from", "hf", "--to", "ember", str(root / "hf"), str(root / "ember")]) == 0
    (root / "tasks").mkdir()
    _write_tasks(root / "tasks")

    from lm_eval.models.huggingface import HFLM

    from ember.evaluation.harness import evaluate_tasks

    hf = HFLM(pretrained=str(root / "hf"), device="cpu", batch_size=4, max_length=MAX_LENGTH)
    reference = evaluate_tasks(hf, TASKS, [str(root / "tasks")], log_samples=True, include_defaults=False,
                               bootstrap_iters=0)
    return {"root": root, "hf_model": hf_model, "tokenizer": tok, "reference": reference}


TASKS = ["ember_test_mc", "ember_test_gen", "ember_test_rolling"]


def _responses(output: dict, task: str) -> list:
    return [sample["resps"] for sample in sorted(output["samples"][task], key=lambda s: s["doc_id"])]


def test_lm_eval_model_matches_hf_per_request_and_in_accuracy(setup):
    from lm_eval.api.registry import get_model

    from ember.evaluation.harness import EmberLM, evaluate_tasks

    root = setup["root"]
    assert get_model("ember") is EmberLM
    lm = EmberLM.create_from_arg_string(f"load={root / 'ember'},max_length={MAX_LENGTH}", {"batch_size": 3})
    output = evaluate_tasks(lm, TASKS, [str(root / "tasks")], log_samples=True, include_defaults=False,
                            bootstrap_iters=0)
    reference = setup["reference"]

    # multiple choice: every (context, choice) loglikelihood, and the is-greedy flags
    ours, theirs = _responses(output, "ember_test_mc"), _responses(reference, "ember_test_mc")
    assert len(ours) == 8 and all(len(r) == 3 for r in ours)
    for ours_doc, theirs_doc in zip(ours, theirs):
        for (ll, greedy), (ll_ref, greedy_ref) in zip((r[0] for r in ours_doc), (r[0] for r in theirs_doc)):
            assert ll == pytest.approx(ll_ref, abs=2e-4, rel=1e-5) and greedy == greedy_ref
    # rolling loglikelihood (documents longer than MAX_LENGTH run in several windows)
    for ours_doc, theirs_doc in zip(_responses(output, "ember_test_rolling"), _responses(reference, "ember_test_rolling")):
        assert ours_doc[0][0] == pytest.approx(theirs_doc[0][0], abs=1e-3, rel=1e-5)
    # generation: the same greedy text, and not an empty one
    generated = _responses(output, "ember_test_gen")
    assert generated == _responses(reference, "ember_test_gen")
    assert any(text[0][0].strip() for text in generated), generated
    # task scores identical
    for task in TASKS:
        for metric, value in reference["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert output["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    assert 0 < reference["results"]["ember_test_mc"]["acc,none"] < 1, "a task every model passes or fails tests little"


def _score(response: list) -> float:
    """The loglikelihood in a response: [(logprob, is_greedy)] or, for rolling requests, [logprob]."""
    first = response[0]
    return first[0] if isinstance(first, (list, tuple)) else first


def _reference_perplexity(setup, texts: list[str], seq_length: int) -> float:
    tok, model = setup["tokenizer"], setup["hf_model"]
    stream = [i for text in texts for i in tok(text)["input_ids"] + [tok.eos_token_id]]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq_length):
            window = torch.tensor([stream[start : start + seq_length + 1]])
            logits = model(window[:, :-1]).logits
            nll += float(torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    assert count == len(stream) - 1
    return math.exp(nll / count)


def test_perplexity_on_raw_text_and_indexed_data_matches_transformers(setup, tmp_path, capsys):
    root = setup["root"]
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, 30, 4)]
    data = tmp_path / "valid.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    expected = _reference_perplexity(setup, texts, seq_length=24)

    out = tmp_path / "ppl.json"
    assert main(["eval", "--load", str(root / "ember"), "--data-path", str(data), "--seq-length", "24",
                 "--batch-size", "3", "--output-path", str(out)]) == 0
    result = json.loads(out.read_text())["perplexity"]
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert "windows/s" in capsys.readouterr().err  # the progress line

    assert main(["preprocess", "--input", str(data), "--output-prefix", str(tmp_path / "valid"),
                 "--tokenizer-name-or-path", str(root / "hf"), "--append-eod"]) == 0
    prefix = next(tmp_path.glob("valid*.idx")).with_suffix("")
    assert main(["eval", "--load", str(root / "ember"), "--data-path", str(prefix), "--seq-length", "24",
                 "--output-path", str(out)]) == 0
    assert json.loads(out.read_text())["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_cli_tasks_give_hf_accuracies(setup, tmp_path):
    root = setup["root"]
    out = tmp_path / "results.json"
    assert main(["eval", "--load", str(root / "ember"), "--tasks", f"{root / 'tasks' / 'mc.yaml'},ember_test_gen",
                 "--include-path", str(root / "tasks"), "--max-length", str(MAX_LENGTH), "--output-path", str(out)]) == 0
    results = json.loads(out.read_text())["lm_eval"]["results"]
    reference = setup["reference"]["results"]
    assert results["ember_test_mc"]["acc,none"] == reference["ember_test_mc"]["acc,none"]
    assert results["ember_test_gen"]["exact_match,none"] == reference["ember_test_gen"]["exact_match,none"]


def test_errors_are_one_line(setup, tmp_path, capsys):
    root = setup["root"]
    cases = [
        (["--data-path", "x", "--tensor-model-parallel-size", "2"], "WORLD_SIZE=1 but tensor-model-parallel-size=2"),
        (["--data-path", "x", "--pipeline-model-parallel-size", "2"], "pipeline-parallel evaluation (pp=2) is not implemented"),
        ([], "needs --data-path"),
        (["--data-path", str(tmp_path / "missing")], "neither an indexed dataset"),
        (["--tasks", str(tmp_path / "missing.yaml")], "missing.yaml does not exist"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(["eval", "--load", str(root / "ember"), *argv]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err
    with pytest.raises(EmberError, match="greedily"):
        from ember.evaluation.harness import EmberLM

        lm = EmberLM(load=str(root / "ember"))

        class Request:
            args = ("Q: cat\nA:", {"until": ["\n"], "do_sample": True, "temperature": 0.7})

        lm.generate_until([Request()])


def test_lm_eval_command_line_runs_the_ember_model(setup, tmp_path, monkeypatch):
    """`python -m ember.evaluation ARGS` is lm-eval's own command line with the ember model
    registered (run in-process here; lm-eval's index of its built-in tasks is skipped, which
    takes half a minute and is not what is tested)."""
    import functools

    from lm_eval.tasks import TaskManager

    from ember.evaluation.__main__ import main as lm_eval_main

    root = setup["root"]
    monkeypatch.setattr(TaskManager, "__init__", functools.partialmethod(TaskManager.__init__, include_defaults=False))
    monkeypatch.setattr(sys, "argv", [
        "lm_eval", "run", "--model", "ember", "--model_args", f"load={root / 'ember'},max_length={MAX_LENGTH}",
        "--tasks", "ember_test_mc", "--include_path", str(root / "tasks"), "--batch_size", "4",
        "--output_path", str(tmp_path / "out")])
    lm_eval_main()
    result = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    assert result["results"]["ember_test_mc"]["acc,none"] == setup["reference"]["results"]["ember_test_mc"]["acc,none"]


@pytest.mark.slow
def test_tensor_parallel_eval_matches_hf(setup, tmp_path):
    """`torchrun --nproc-per-node 2 -m ember eval --tensor-model-parallel-size 2`: the model split
    over two gloo ranks gives lm-eval `hf`'s loglikelihoods (padded to the sharded model's fixed
    shapes) and generated text (the KV cache holds each rank's share of the heads, the prompt goes
    in in pieces). One document per task: on CPU every new input shape costs the sharded layers
    seconds."""
    from dist_utils import run_ranks

    root = setup["root"]
    out = tmp_path / "tp.json"
    result = run_ranks(["-m", "ember", "eval", "--load", str(root / "ember"), "--tensor-model-parallel-size", "2",
                        "--device", "cpu", "--tasks", "ember_test_mc,ember_test_gen", "--limit", "1", "--batch-size", "4",
                        "--include-path", str(root / "tasks"), "--max-length", str(MAX_LENGTH), "--log-samples",
                        "--output-path", str(out)], nprocs=2, timeout=240)
    assert result.returncode == 0, result.output[-4000:]
    samples, reference = json.loads(out.read_text())["lm_eval"]["samples"], setup["reference"]
    assert [s["resps"] for s in samples["ember_test_gen"]] == _responses(reference, "ember_test_gen")[:1]
    ours = [_score(req) for s in samples["ember_test_mc"] for req in s["resps"]]
    theirs = [_score(req) for req in _responses(reference, "ember_test_mc")[0]]
    assert len(ours) == 3 and ours == pytest.approx(theirs, abs=2e-4, rel=1e-5)


def test_ember_lm_eval_without_lm_eval_says_what_to_install(monkeypatch):
    """`ember-lm-eval` on an install without the eval extra: one line, not a traceback."""
    import sys

    from ember.evaluation.__main__ import main

    for name in ["lm_eval", "lm_eval.__main__", *(m for m in sys.modules if m.startswith("lm_eval."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed (restored afterwards)
    monkeypatch.delitem(sys.modules, "ember.evaluation.harness", raising=False)  # restored afterwards
    with pytest.raises(SystemExit, match=r"needs lm-evaluation-harness .*pip install 'ember\[eval\]'"):
        main()
