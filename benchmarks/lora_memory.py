"""Optimizer state and peak RSS of ember train, full fine-tune vs LoRA, on the 56M-class shape.

    OMP_NUM_THREADS=2 python benchmarks/lora_memory.py full
    OMP_NUM_THREADS=2 python benchmarks/lora_memory.py lora             # r=16, all linear layers
    OMP_NUM_THREADS=2 python benchmarks/lora_memory.py lora-bf16        # the same under --bf16
    OMP_NUM_THREADS=2 python benchmarks/lora_memory.py lora-bf16-base   # and the frozen base kept in bf16
One process per mode (peak RSS is per process); the trainer is ember's own (fp32, AdamW, 3 steps).
"""
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import torch  # noqa: E402
from dist_utils import train_config, write_token_dataset  # noqa: E402

from ember.train.trainer import Trainer  # noqa: E402

mode = sys.argv[1]
tmp = Path(tempfile.mkdtemp(prefix="lora-mem-"))
data = write_token_dataset(tmp / "tokens", documents=400, vocab=32000)
argv = ["--model", "llama2-7b", "--num-layers", "8", "--hidden-size", "512", "--num-attention-heads", "8",
        "--num-query-groups", "4", "--ffn-hidden-size", "1408", "--vocab-size", "32000", "--seq-length", "512",
        "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-4",
        "--data-path", str(data), "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "1",
        "--output-dir", str(tmp / "out"), "--no-tensorboard"]
if mode.startswith("lora"):
    argv += ["--lora-target-modules", "all-linear", "--lora-r", "16", "--lora-alpha", "32"]
if mode == "lora-bf16-base":
    argv += ["--bf16", "--lora-base-bf16"]
if mode == "lora-bf16":
    argv += ["--bf16"]
trainer = Trainer(train_config(argv)).setup()
t = time.perf_counter()
trainer.train()
elapsed = time.perf_counter() - t
state = trainer.optimizer.state
opt_bytes = sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if torch.is_tensor(v))
params = sum(p.numel() for p in trainer.model.parameters())
trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

grad_bytes = 4 * sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)  # fp32, set to None after each step
param_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"lora_memory mode={mode} params={params/1e6:.2f}M trainable={trainable/1e6:.3f}M "
      f"param_MB={param_bytes/1e6:.1f} grad_MB={grad_bytes/1e6:.1f} optimizer_state_MB={opt_bytes/1e6:.1f} peak_rss_MB={rss:.0f} train_s={elapsed:.1f}")
trainer.close(finished=True)
