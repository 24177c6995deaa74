"""`ember generate`: text from an ember weight folder or an `ember train --save` folder (the
seeds' predict mode).

    ember generate --load DIR --prompt "Once upon a time" --max-new-tokens 64
    ember generate --load DIR --prompt "..." --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1
    ember generate --load DIR --chat [--system "You are terse."]     # a conversation, one user line per turn
    ember generate --load DIR --chat --messages chat.json             # the reply to a messages file

`--chat` lays the conversation out with the tokenizer's own chat template (as Hugging Face's
`apply_chat_template(..., add_generation_prompt=True)` does) and stops at the template's
end-of-turn token; see ember.data.chat.

Greedy by default; sampling with temperature / top-k / top-p when --temperature > 0. Streams text
to the terminal as tokens arrive. The decoding itself is `ember.generation`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from ember.errors import EmberError

_DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", type=Path, required=True, help="ember weight folder (ember convert --to ember) or an ember train --save folder")
    parser.add_argument(
        "--tokenizer-name-or-path", type=Path, default=None, help="local tokenizer folder (default: LOAD/tokenizer)"
    )
    parser.add_argument("--prompt", default=None, help="text to continue (or --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    parser.add_argument("--top-k", type=int, default=0, help="sample only among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding, whatever the sampling flags say")
    parser.add_argument("--eos-id", type=int, default=None, help="stop token (default: the tokenizer's eos)")
    parser.add_argument("--lora-load", type=Path, default=None,
                        help="run the model with this LoRA adapter (a PEFT adapter folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="keep", help="cast weights (default: as stored)")
    # chat (H5): conversations through the tokenizer's chat template
    parser.add_argument("--chat", action="store_true",
                        help="chat through the tokenizer's chat template: one user turn per stdin line "
                             "(/reset, /exit), or the replies to --messages")
    parser.add_argument("--messages", type=Path, default=None,
                        help="with --chat: a .json conversation ([{role, content}, ...], or {messages|conversations}) "
                             "or a .jsonl of them (one JSON line out per conversation)")
    parser.add_argument("--system", default=None, help="with --chat: system prompt for conversations without one")


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """One line for the first decoding setting out of range (nan fails every comparison here)."""
    if max_new_tokens < 1:
        raise EmberError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise EmberError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise EmberError(f"--top-k must be >= 0 (0: all tokens), got {top_k}")
    if not 0 < top_p <= 1:
        raise EmberError(f"--top-p must be in (0, 1] (1: off), got {top_p}")


def run(args: argparse.Namespace) -> int:
    from ember.checkpoint.export import is_training_checkpoint, load_model_from_training_checkpoint
    from ember.checkpoint.weights import load_model, read_manifest
    from ember.generation import TextCodec, generate, stream_text

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)  # before any file is read
    check_chat_arguments(args)
    from_training = is_training_checkpoint(args.load)
    if not from_training:
        read_manifest(args.load)  # a clear error for a folder that is not ember weights, first
    if from_training:  # a `--save` folder of ember train: weights and tokenizer from its checkpoint
        model, trained_tokenizer = load_model_from_training_checkpoint(args.load, args.device, _DTYPES[args.dtype])
        tokenizer_dir = args.tokenizer_name_or_path or trained_tokenizer
    else:
        model = None
        tokenizer_dir = args.tokenizer_name_or_path or args.load / "tokenizer"
    if tokenizer_dir is None or not tokenizer_dir.is_dir():
        raise EmberError(f"no tokenizer folder at {tokenizer_dir}; pass --tokenizer-name-or-path DIR")
    codec = TextCodec(tokenizer_dir)
    if model is None:
        model = load_model(args.load, device=args.device, dtype=_DTYPES[args.dtype])
    if getattr(args, "lora_load", None):  # LoRA (issue 17): base + a PEFT adapter folder
        from ember.generation import attach_peft_adapter

        attach_peft_adapter(model, args.lora_load, None if from_training else read_manifest(args.load)["family"])
    if args.chat:
        return run_chat(args, model, codec, tokenizer_dir)
    prompt_ids = codec.encode(args.prompt)
    if not prompt_ids:
        raise EmberError("the prompt encodes to no tokens; give some text")
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device="cpu" if args.device == "cpu" else args.device).manual_seed(args.seed)
    temperature = 0.0 if args.greedy else args.temperature
    eos_id = args.eos_id if args.eos_id is not None else codec.eos_id

    sys.stdout.write(args.prompt)
    started = time.perf_counter()
    tokens = generate(model, prompt_ids, args.max_new_tokens, temperature, args.top_k, args.top_p, eos_id, generator)
    new_ids = stream_text(codec, tokens)
    elapsed = time.perf_counter() - started
    print(f"[{len(new_ids)} tokens in {elapsed:.2f}s, {len(new_ids) / elapsed:.1f} tokens/s]", file=sys.stderr)
    return 0


# ---- chat (H5) ---------------------------------------------------------------------------------

def check_chat_arguments(args: argparse.Namespace) -> None:
    if args.chat and args.prompt is not None:
        raise EmberError("--chat takes its turns from stdin or --messages, not --prompt; drop one of them")
    if not args.chat and args.prompt is None:
        raise EmberError("give --prompt TEXT to continue, or --chat to converse through the tokenizer's chat template")
    if not args.chat and (args.messages is not None or args.system is not None):
        raise EmberError("--messages and --system need --chat")


def run_chat(args: argparse.Namespace, model, codec, tokenizer_dir: Path) -> int:
    """Replies through the tokenizer's chat template: to each conversation of --messages, or turn by
    turn to stdin lines, the history re-rendered each turn (as transformers' chat pipelines do)."""
    import io
    import json

    from ember.data.chat import load_chat_template, read_conversations
    from ember.data.tokenizers import HFTokenizer
    from ember.generation import generate, stream_text

    template = load_chat_template(tokenizer_dir)
    tokenizer = HFTokenizer(tokenizer_dir)
    stop = template.stop_token_ids(tokenizer.backend) if tokenizer.backend is not None else set()
    eos_id = args.eos_id if args.eos_id is not None else codec.eos_id
    stop |= {eos_id} if eos_id is not None else set()
    temperature = 0.0 if args.greedy else args.temperature
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device="cpu" if args.device == "cpu" else args.device).manual_seed(args.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []

    def reply(messages: list[dict], out) -> str:
        prompt_ids = tokenizer.encode(template.render(messages, add_generation_prompt=True), add_special_tokens=False)
        started = time.perf_counter()
        tokens = generate(model, prompt_ids, args.max_new_tokens, temperature, args.top_k, args.top_p, stop, generator)
        new_ids = stream_text(codec, tokens, out)
        elapsed = time.perf_counter() - started
        print(f"[{len(new_ids)} tokens in {elapsed:.2f}s, {len(new_ids) / elapsed:.1f} tokens/s]", file=sys.stderr)
        return codec.decode(new_ids[:-1] if new_ids and new_ids[-1] in stop else new_ids)

    def with_system(messages: list[dict]) -> list[dict]:
        return messages if messages and messages[0].get("role") == "system" else system + messages

    if args.messages is not None:
        conversations = read_conversations(args.messages)
        for messages in conversations:
            messages = with_system(messages)
            if args.messages.suffix == ".jsonl":
                answer = reply(messages, io.StringIO())
                print(json.dumps({"messages": messages + [{"role": "assistant", "content": answer}]},
                                 ensure_ascii=False), flush=True)
            else:
                reply(messages, sys.stdout)
        return 0
    interactive = sys.stdin.isatty()
    messages = list(system)
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        text = line.rstrip("\r\n")
        if text.strip() == "/reset":
            messages = list(system)
        elif text.strip():
            messages.append({"role": "user", "content": text})
            messages.append({"role": "assistant", "content": reply(messages, sys.stdout)})
