"""Peak memory and time of `ember convert`, HF -> ember -> HF, on a synthetic sharded checkpoint.

    python benchmarks/convert.py                 # ~510 MB bf16 Llama-shaped model, ~100 MB shards
    python benchmarks/convert.py --layers 32 --dim 2048 --shard-mb 500

Writes a Hugging Face style checkpoint (config.json, model-0000k-of-0000n.safetensors, index)
with random weights, shard by shard; runs each conversion in a fresh process that imports
everything first, resets the kernel's RSS high-water mark, converts, and reports the peak RSS
above what it had after the imports (importing torch alone peaks higher than a small
conversion, so ru_maxrss would hide it). Checks the round trip is bit-exact.

Recorded on the 2-core shared CPU dev box (torch 2.13 CPU), RSS after imports 221 MB:

    defaults (254M params, 509 MB in 6 shards, largest shard 95 MB, largest tensor 66 MB)
        hf->ember  +161 MB converting, 6.4s      ember->hf  +164 MB, 5.0s
    --layers 4 --vocab 64000 (357 MB in 3 shards, largest shard = largest tensor 131 MB)
        hf->ember  +203 MB                       ember->hf  +217 MB
    --layers 32 --vocab 8000 (788 MB in 9 shards, largest shard 99 MB, largest tensor 16 MB)
        hf->ember  +95 MB                        ember->hf  +94 MB
    round trip bit-exact in all three.

So the memory a conversion holds is a fixed ~80 MB plus about the largest tensor: it grows
with the largest tensor, stays below the largest shard plus that constant, and does not grow
with the model (the 788 MB model needs the least).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ember.checkpoint.weights import ShardedWriter, TensorEntry, WeightFiles, read_stored_tensor  # noqa: E402

_MEASURE = """
import resource, sys
from ember.commands import convert  # everything the conversion imports, before measuring
from ember.cli import main

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

# Importing torch peaks above what a small conversion needs; reset the high-water mark
# (Linux clear_refs 5) so VmHWM covers the conversion only.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
rc = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
print("RSS_KB", before, status("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def llama_tensors(layers: int, dim: int, ffn: int, vocab: int, heads: int, kv_heads: int) -> list[TensorEntry]:
    head_dim = dim // heads
    entries = [TensorEntry("model.embed_tokens.weight", torch.bfloat16, (vocab, dim))]
    for i in range(layers):
        p = f"model.layers.{i}."
        entries += [
            TensorEntry(p + "self_attn.q_proj.weight", torch.bfloat16, (dim, dim)),
            TensorEntry(p + "self_attn.k_proj.weight", torch.bfloat16, (kv_heads * head_dim, dim)),
            TensorEntry(p + "self_attn.v_proj.weight", torch.bfloat16, (kv_heads * head_dim, dim)),
            TensorEntry(p + "self_attn.o_proj.weight", torch.bfloat16, (dim, dim)),
            TensorEntry(p + "mlp.gate_proj.weight", torch.bfloat16, (ffn, dim)),
            TensorEntry(p + "mlp.up_proj.weight", torch.bfloat16, (ffn, dim)),
            TensorEntry(p + "mlp.down_proj.weight", torch.bfloat16, (dim, ffn)),
            TensorEntry(p + "input_layernorm.weight", torch.bfloat16, (dim,)),
            TensorEntry(p + "post_attention_layernorm.weight", torch.bfloat16, (dim,)),
        ]
    entries += [
        TensorEntry("model.norm.weight", torch.bfloat16, (dim,)),
        TensorEntry("lm_head.weight", torch.bfloat16, (vocab, dim)),
    ]
    return entries


def write_synthetic_hf(folder: Path, args: argparse.Namespace) -> list[TensorEntry]:
    """A HF checkpoint written one tensor at a time (the benchmark itself stays small too)."""
    folder.mkdir(parents=True)
    entries = llama_tensors(args.layers, args.dim, args.ffn, args.vocab, args.heads, args.kv_heads)
    writer = ShardedWriter(folder, entries, args.shard_mb * 10**6)
    generator = torch.Generator().manual_seed(0)
    for entry in entries:
        writer.write(entry.name, (torch.randn(entry.shape, generator=generator) * 0.02).to(entry.dtype))
    writer.close()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.dim,
        "intermediate_size": args.ffn, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return entries


def measure(argv: list[str]) -> tuple[float, float, float]:
    """(RSS before converting, peak RSS while converting, seconds), in MB, of one fresh
    process running `ember <argv>`."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ember {' '.join(argv)} failed:\n{done.stderr}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RSS_KB"))
    before, peak, _ = (int(v) / 1024 for v in line.split()[1:])
    return before, peak, elapsed


def same_tensors(a: Path, b: Path) -> bool:
    """Compare two HF folders tensor by tensor, streaming (never both models in memory)."""
    right = {entry.name: entry for _, entry in WeightFiles(b).entries()}
    count = 0
    for path, name, tensor in WeightFiles(a).tensors():
        entry = right[name]
        with open(entry.path, "rb") as f:
            if not torch.equal(read_stored_tensor(f, entry), tensor):
                return False
        count += 1
    return count == len(right)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        entries = write_synthetic_hf(root / "hf", args)
        total = sum(e.nbytes for e in entries) / 1e6
        shards = sorted((root / "hf").glob("*.safetensors"))
        largest_shard = max(p.stat().st_size for p in shards) / 1e6
        largest_tensor = max(e.nbytes for e in entries) / 1e6
        shard = f"{args.shard_mb}MB"
        runs = {
            "hf->ember": ["--from", "hf", "--to", "ember", str(root / "hf"), str(root / "ember")],
            "ember->hf": ["--from", "ember", "--to", "hf", str(root / "ember"), str(root / "back")],
        }
        results = []
        for name, argv in runs.items():
            before, peak, seconds = measure(["convert", *argv, "--max-shard-size", shard])
            results.append(f"{name} +{peak - before:.0f} MB over {before:.0f} MB, {seconds:.1f}s")
        exact = same_tensors(root / "hf", root / "back")
        # one comparable line: the model, then what each direction held above its imports
        print(
            f"convert: {total:.0f} MB bf16 in {len(shards)} shards (largest shard {largest_shard:.0f} MB, "
            f"largest tensor {largest_tensor:.0f} MB); {'; '.join(results)}; round trip bit-exact: {exact}"
        )

if __name__ == "__main__":
    main()
