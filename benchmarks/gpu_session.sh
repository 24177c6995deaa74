#!/usr/bin/env bash
# Every GPU check of benchmarks/RESULTS.md in one call of a few minutes, for a lent GPU machine:
# the device's measured ceilings, 1B and 3B Llama training (ember vs transformers, bf16, seq 4096,
# float8 through torchao when its wheel is in .whl/), the kernels each step ran, and a tiny run's
# losses on GPU vs CPU. Each stage has its own time limit, so one failure does not cost the rest.
#
#   bash benchmarks/gpu_session.sh            # logs under $OUT (or /tmp/ember-gpu), a summary last
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/ember-gpu}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

if ls .whl/*.whl >/dev/null 2>&1; then  # packages the machine's image lacks (torchao, orjson)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, keep the log, put its result lines in the summary
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$SUMMARY"
    grep -E "^(train_gpu|matmul_peak|gpu_cpu_agreement)" "$OUT/$name.log" | tee -a "$SUMMARY"
    if [ "$rc" -ne 0 ]; then tail -n 8 "$OUT/$name.log" | tee -a "$SUMMARY"; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee -a "$SUMMARY"
stage peak 60 python3 benchmarks/matmul_peak.py
stage train_1b 260 python3 benchmarks/train_gpu.py --model 1b --sides ember hf ember-fp8 --steps 15 --warmup 4 --check-kernels
stage train_3b 160 python3 benchmarks/train_gpu.py --model 3b --sides ember hf --steps 10 --warmup 3 --check-kernels
stage agreement 70 python3 benchmarks/gpu_cpu_agreement.py --steps 20
echo "=== summary"; cat "$SUMMARY"
