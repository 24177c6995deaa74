"""`ember eval`: judge a checkpoint — perplexity on a dataset, accuracy on lm-eval benchmarks.

    ember eval --load CKPT --data-path data/valid_text_document --seq-length 1024
    ember eval --load CKPT --data-path valid.jsonl --json-key text
    ember eval --load CKPT --tasks my_mc_task,my_gen_task --include-path tasks/ --num-fewshot 5
    ember eval --load CKPT --tasks tasks/my_task.yaml --limit 100 --output-path results.json

CKPT is an ember weight folder (`ember convert --to ember`) or an `ember train --save` folder.
Benchmarks run through lm-evaluation-harness with ember's model class (ember.evaluation.harness);
task data is read from local files only (HF_DATASETS_OFFLINE=1 unless set otherwise). The model
runs whole on one device, or split over several with tensor parallelism:

    torchrun --nproc-per-node 4 -m ember eval --load CKPT --tensor-model-parallel-size 4 --tasks ...

(pipeline-parallel evaluation is not implemented and is refused in one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ember.errors import EmberError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", type=Path, required=True,
                        help="ember weight folder or ember train --save folder")
    parser.add_argument("--tokenizer-name-or-path", type=Path, default=None,
                        help="local tokenizer folder (default: LOAD/tokenizer, or the one training used)")
    parser.add_argument("--device", default=None, help="cuda / cpu / npu (default: cuda when present)")
    parser.add_argument("--dtype", choices=["keep", "fp32", "bf16", "fp16"], default="keep",
                        help="cast the weights (default: as stored)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows or requests per forward")
    parser.add_argument("--output-path", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="split the model over this many devices (one process each, under torchrun)")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                        help="must be 1: pipeline-parallel evaluation is not implemented")
    ppl = parser.add_argument_group("perplexity")
    ppl.add_argument("--data-path", type=Path, default=None,
                     help="indexed dataset prefix (PREFIX.bin/.idx) or a .txt / .jsonl / .parquet file")
    ppl.add_argument("--seq-length", type=int, default=None, help="window length (default: the model's max_seq_len)")
    ppl.add_argument("--json-key", default="text", help="text key of .jsonl records / .parquet column")
    ppl.add_argument("--max-windows", type=int, default=None, help="stop after this many windows")
    bench = parser.add_argument_group("benchmarks (lm-evaluation-harness)")
    bench.add_argument("--tasks", default=None,
                       help="comma-separated lm-eval task names or task YAML files")
    bench.add_argument("--include-path", action="append", default=[],
                       help="folder of lm-eval task YAML files (repeatable)")
    bench.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    bench.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    bench.add_argument("--max-length", type=int, default=None, help="context length (default: the model's max_seq_len)")
    bench.add_argument("--seed", type=int, default=1234)
    bench.add_argument("--bootstrap-iters", type=int, default=100000,
                       help="bootstrap resamples for the standard errors of non-mean metrics (0: none)")
    bench.add_argument("--log-samples", action="store_true",
                       help="also write every request's response (loglikelihoods, generated text) to --output-path")


def run(args: argparse.Namespace) -> int:
    if args.data_path is None and not args.tasks:
        raise EmberError("ember eval needs --data-path (perplexity) and/or --tasks (benchmarks)")
    if args.batch_size < 1:
        raise EmberError(f"--batch-size must be >= 1, got {args.batch_size}")
    from ember.evaluation.loading import check_layout, is_reporting_rank

    check_layout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    try:
        return _evaluate(args, is_reporting_rank())
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _evaluate(args: argparse.Namespace, report: bool) -> int:
    from ember.evaluation.loading import load_checkpoint, parse_dtype

    model, tokenizer_dir = load_checkpoint(args.load, args.device, parse_dtype(args.dtype), args.tokenizer_name_or_path,
                                           args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    results: dict = {"load": str(args.load), "tensor_model_parallel_size": args.tensor_model_parallel_size}
    if args.data_path is not None:
        from ember.evaluation.perplexity import evaluate_perplexity, read_token_stream

        stream = read_token_stream(args.data_path, tokenizer_dir, args.json_key)
        seq_length = args.seq_length or model.args.max_seq_len
        result = evaluate_perplexity(model, stream, seq_length, args.batch_size, args.max_windows, progress=report)
        results["perplexity"] = {"data_path": str(args.data_path), "seq_length": seq_length, **result.as_dict()}
        if report:
            print(f"perplexity {result.perplexity:.4f}  (nll/token {result.mean_nll:.4f}, {result.tokens} tokens, "
                  f"{result.windows} windows of {seq_length}, {result.tokens / max(result.seconds, 1e-9):.0f} tokens/s)")
    if args.tasks:
        results["lm_eval"] = _run_tasks(args, model, tokenizer_dir, report)
    if args.output_path is not None and report:
        args.output_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output_path.with_name(args.output_path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
        tmp.replace(args.output_path)
    return 0


def _run_tasks(args: argparse.Namespace, model, tokenizer_dir: Path | None, report: bool) -> dict:
    try:
        from ember.evaluation import harness
    except ImportError as err:
        raise EmberError(f"--tasks needs lm-evaluation-harness ({err}); pip install 'ember[eval]'") from None
    from lm_eval.utils import make_table

    from ember.evaluation.loading import need_tokenizer

    harness.offline()
    lm = harness.EmberLM(model=model, tokenizer=need_tokenizer(tokenizer_dir, "--tasks"), batch_size=args.batch_size,
                         max_length=args.max_length)
    tasks = [t for t in args.tasks.split(",") if t]
    output = harness.evaluate_tasks(lm, tasks, args.include_path, args.num_fewshot, args.limit, args.seed,
                                    log_samples=args.log_samples, bootstrap_iters=args.bootstrap_iters)
    if output is None:  # lm-eval reports on the first process only (every tensor-parallel rank ran the requests)
        return {}
    if report:
        print(make_table(output))
        sys.stdout.flush()
    summary = {"results": output.get("results", {}), "n-shot": output.get("n-shot", {}),
               "versions": output.get("versions", {})}
    if args.log_samples:
        summary["samples"] = {task: [{"doc_id": s["doc_id"], "resps": s["resps"], "filtered_resps": s["filtered_resps"]}
                                     for s in sorted(samples, key=lambda s: s["doc_id"])]
                              for task, samples in output.get("samples", {}).items()}
    return summary
