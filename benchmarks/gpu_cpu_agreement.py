"""The same tiny training run on the GPU and on the CPU: same initial weights, same batches, the
trainer's own step (fused loss, clipping, fused AdamW). Prints every step's loss on both and the
largest difference.

    python benchmarks/gpu_cpu_agreement.py                  # fp32, 20 steps
    python benchmarks/gpu_cpu_agreement.py --precision bf16

The CPU side runs in a child process with CUDA_VISIBLE_DEVICES="" (ember picks its device by
itself); it writes its initial weights, which the GPU side loads, so both start from the same
point whatever each device's random generator would draw. In fp32 the two differ only by the
order of floating-point reductions (no TF32: ember leaves torch's fp32 matmul default alone), so the
gap stays near 1e-6 relative; bf16 rounds differently on each device and drifts further.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_training import Shape, ember_step, ember_trainer, initial_state, scratch_dir, take_batches  # noqa: E402

SHAPE = Shape("tiny", "tiny-llama", seq_length=128, micro_batch_size=4)


def run(steps: int, precision: str, state_path: str, load: bool) -> tuple[list[float], str]:
    """Losses of `steps` trainer steps; saves the initial weights to `state_path`, or loads them."""
    with scratch_dir("ember-agreement-") as workdir:
        trainer = ember_trainer(SHAPE, workdir, steps, precision=precision, compile=False)
        if load:
            trainer.model.load_state_dict(torch.load(state_path))
        else:
            torch.save(initial_state(trainer), state_path)
        step = ember_step(trainer)
        losses = [float(step(batch)) for batch in take_batches(trainer, steps)]
        device = str(trainer.device)
        trainer.close()
    return losses, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--child", metavar="STATE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        losses, device = run(args.steps, args.precision, args.child, load=False)
        print(json.dumps({"losses": losses, "device": device}))
        return
    if not torch.cuda.is_available():
        parser.error("no GPU here: this compares a GPU run with a CPU run")
    with scratch_dir("ember-agreement-state-") as tmp:
        state_path = os.path.join(tmp, "initial.pt")
        child = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--precision", args.precision,
                                "--child", state_path], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                               capture_output=True, text=True, check=True)
        cpu = json.loads(child.stdout.strip().splitlines()[-1])
        gpu_losses, gpu_device = run(args.steps, args.precision, state_path, load=True)
    diffs = [abs(a - b) for a, b in zip(gpu_losses, cpu["losses"])]
    for i, (g, c) in enumerate(zip(gpu_losses, cpu["losses"])):
        print(f"step {i:3d}  {gpu_device} {g:.6f}  {cpu['device']} {c:.6f}  diff {abs(g - c):.2e}")
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    print(f"gpu_cpu_agreement precision={args.precision} steps={args.steps} model={SHAPE.base_model} "
          f"max_abs_diff={diffs[worst]:.3e} max_rel_diff={diffs[worst] / abs(cpu['losses'][worst]):.3e} "
          f"first_loss={gpu_losses[0]:.4f} last_loss_gpu={gpu_losses[-1]:.4f} last_loss_cpu={cpu['losses'][-1]:.4f}",
          flush=True)


if __name__ == "__main__":
    main()
