"""Generation speed on this CPU: ember's KV-cached greedy decoding vs transformers' `generate`.

    python benchmarks/generate_cpu.py                       # both shapes, batch 1 and 4, all cores
    python benchmarks/generate_cpu.py --shape tiny --batch 4 --rounds 9
    python benchmarks/generate_cpu.py --threads 1 --clock cpu   # steadier on a busy machine
    python benchmarks/generate_cpu.py --profile             # also print ember's top ops per call
    python benchmarks/generate_cpu.py --before              # ember as it was: one prompt at a time, full forward

One Llama model built by transformers (LlamaConfig, random weights), converted to ember with
ember's Hugging Face mapping (ember.models.hf.TensorMapper). Batch 1 is one prompt; batch B is B
prompts of different lengths, left-padded into one tensor with an attention mask for transformers
and passed as a list to `ember.generation.generate_batch`. Both sides decode `--new-tokens` tokens
greedily (EOS off) and take turns call by call, so load on a shared machine hits both alike; the
figures are medians over the timed calls (one warm-up call each, not timed). Every call's tokens
are compared: the script fails if ember's greedy tokens differ from transformers'. Per case:

    generate_cpu shape=56m batch=4 new_tokens=64 before=0 threads=2 clock=wall rounds=7 ember_tokens_per_s=...
                 hf_tokens_per_s=... ratio=... paired_ratio=... best_ratio=... floor_tokens_per_s=...
                 ember_first_call_s=... hf_first_call_s=... tokens_identical=1 load1=...

`ratio` = HF median time / ember median time; `paired_ratio` the median over rounds of the same
quotient (steadier while the load drifts); `best_ratio` the quotient of the fastest calls (closest
to a quiet machine). `floor_tokens_per_s` is the pace of the decode steps' weight matmuls alone
(`matmul_floor_runner`, nn.Linear's [out, in] layout), timed in the same turns; ember's fused
decode step, with its matrices copied once into the [in, out] layout, runs below it. The first
(warm-up, untimed) call of each side is reported as `*_first_call_s`: ember's includes laying
out those copies, which later calls reuse while the weights stay unchanged. Results and the
machine they came from: RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from ember.models import Transformer
from ember.models.hf import TensorMapper, args_from_hf_config

SHAPES = {
    # the 56M Llama of benchmarks/train_cpu.py
    "56m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1408, vocab_size=32000),
    # per-step overhead dominates here
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=352, vocab_size=8000),
}
PROMPT_LENGTHS = (32, 19, 27, 11, 24, 16, 30, 8)  # batch B takes the first B


def build_pair(shape: str, seed: int = 0) -> tuple[torch.nn.Module, Transformer]:
    """(transformers LlamaForCausalLM, ember Transformer) with the same random weights. Weights
    are drawn wider than the default init so greedy paths are not flat (near-ties between
    logits would make 'identical tokens' a matter of rounding)."""
    import transformers

    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=512, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.06)
    family, args = args_from_hf_config(config.to_dict())
    ember = Transformer(args)
    mapper = TensorMapper(family, args)
    state = {}
    for name, tensor in hf.state_dict().items():
        state.update(mapper.to_ember(name, tensor))
    missing, unexpected = ember.load_state_dict(state, strict=False)
    if [m for m in missing if "rope" not in m] or unexpected or mapper.pending():
        raise RuntimeError(f"conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf, ember.eval()


def prompts_for(batch: int, vocab: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS[:batch]]


def hf_runner(hf: torch.nn.Module, prompts: list[list[int]], new_tokens: int, pad_id: int = 0):
    """transformers' generate with its (default, dynamic) KV cache over left-padded prompts."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run() -> list[list[int]]:
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=pad_id, use_cache=True)
        return out[:, width:].tolist()

    return run


def ember_runner(model: Transformer, prompts: list[list[int]], new_tokens: int, before: bool = False):
    from ember.generation import generate_batch

    def run() -> list[list[int]]:
        if before:
            return [_generate_before(model, p, new_tokens) for p in prompts]
        return generate_batch(model, prompts, new_tokens)

    return run


@torch.inference_mode()
def _generate_before(model: Transformer, prompt: list[int], new_tokens: int) -> list[int]:
    """ember's greedy decoding before the decode path (`--before`): one prompt at a time, the
    transformer's full forward for each step (mask and positions rebuilt, every prompt logit)."""
    cache = model.new_kv_cache(1, len(prompt) + new_tokens)
    logits = model(torch.tensor([prompt]), kv_cache=cache)[0, -1]
    out = []
    for step in range(new_tokens):
        out.append(int(torch.argmax(logits)))
        if step + 1 < new_tokens:
            logits = model(torch.tensor([[out[-1]]]), kv_cache=cache)[0, -1]
    return out


def matmul_floor_runner(model: Transformer, batch: int, new_tokens: int):
    """What the decode steps would cost if they were only their weight matmuls: every linear
    layer once per step on a [batch, in] input, in nn.Linear's layout. At 56M and batch 1 these
    read every weight per token and set the pace of transformers; the rest of a step is overhead."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}

    def run() -> None:
        with torch.inference_mode():
            for _ in range(new_tokens):
                for w in weights:
                    torch.nn.functional.linear(inputs[w.shape[1]], w)

    return run


def measure(runners: dict, rounds: int, clock) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Each side once per round, in turn; round 0 is a warm-up (its time comes first in the
    lists: ember's first call also lays out its decode weights)."""
    seconds = {name: [] for name in runners}
    outputs = {name: [] for name in runners}
    for _ in range(rounds + 1):
        for name, run in runners.items():
            start = clock()
            tokens = run()
            seconds[name].append(clock() - start)
            outputs[name].append(tokens)
    return seconds, outputs


def profile_ember(run, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7, help="timed calls per side (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--before", action="store_true", help="ember's decoding before the decode path (baseline)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    failed = False
    for shape in shapes:
        hf, ember = build_pair(shape)
        for batch in args.batch:
            if batch > len(PROMPT_LENGTHS):
                parser.error(f"--batch at most {len(PROMPT_LENGTHS)}")
            prompts = prompts_for(batch, SHAPES[shape]["vocab_size"])
            runners = {"ember": ember_runner(ember, prompts, args.new_tokens, args.before),
                       "hf": hf_runner(hf, prompts, args.new_tokens),
                       "floor": matmul_floor_runner(ember, batch, args.new_tokens)}
            seconds, outputs = measure(runners, args.rounds, clock)
            first = {name: times.pop(0) for name, times in seconds.items()}
            identical = all(e == h for e, h in zip(outputs["ember"], outputs["hf"]))
            failed |= not identical
            tokens = batch * args.new_tokens
            ember_s, hf_s = statistics.median(seconds["ember"]), statistics.median(seconds["hf"])
            floor_s = statistics.median(seconds["floor"])
            paired = statistics.median(h / e for e, h in zip(seconds["ember"], seconds["hf"]))
            print(f"generate_cpu shape={shape} batch={batch} new_tokens={args.new_tokens} before={int(args.before)} "
                  f"threads={torch.get_num_threads()} clock={args.clock} rounds={args.rounds} "
                  f"ember_tokens_per_s={tokens / ember_s:.1f} hf_tokens_per_s={tokens / hf_s:.1f} "
                  f"ratio={hf_s / ember_s:.2f} paired_ratio={paired:.2f} "
                  f"best_ratio={min(seconds['hf']) / min(seconds['ember']):.2f} "
                  f"floor_tokens_per_s={tokens / floor_s:.1f} ember_first_call_s={first['ember']:.2f} "
                  f"hf_first_call_s={first['hf']:.2f} tokens_identical={int(identical)} "
                  f"load1={os.getloadavg()[0]:.2f}", flush=True)
            if not identical:
                first = next(i for i, (e, h) in enumerate(zip(outputs["ember"], outputs["hf"])) if e != h)
                print(f"  differ (call {first}): ember {outputs['ember'][first]}\n  hf    {outputs['hf'][first]}")
            if args.profile:
                profile_ember(runners["ember"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
