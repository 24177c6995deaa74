"""The device's measured ceilings, to set MFU against something real besides the datasheet:
a large bf16 matrix product on random data (TFLOP/s) and a large device-to-device copy (GB/s,
bytes read + written). Medians over timed repeats after warm-up, timed with CUDA events.

    python benchmarks/matmul_peak.py
"""

from __future__ import annotations

import statistics

import torch


def _median_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("matmul_peak: no GPU here")
    n = 8192
    # several operand sets, so that repeats do not measure one set sitting in L2
    operands = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
                 torch.randn(n, n, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
    turn = iter(range(10**9))

    def matmul():
        a, b = operands[next(turn) % len(operands)]
        torch.mm(a, b)

    ms = _median_ms(matmul)
    tflops = 2 * n**3 / (ms / 1e3) / 1e12
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()  # 1 GiB
    target = torch.empty_like(source)
    copy_ms = _median_ms(lambda: target.copy_(source))
    gbps = 2 * source.numel() / (copy_ms / 1e3) / 1e9
    print(f"matmul_peak device=\"{torch.cuda.get_device_name()}\" torch={torch.__version__} "
          f"bf16_{n}^3_tflops={tflops:.0f} copy_gb_per_s={gbps:.0f}", flush=True)


if __name__ == "__main__":
    main()
