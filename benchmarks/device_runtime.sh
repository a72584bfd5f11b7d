#!/usr/bin/env bash
# One device run for the compiled runtime's GPU must-shows (issues 15 and 16), from the
# repository root on the GPU machine, with the models of `bench_e2e.py --make DIR` carried
# in .carry/e2e (float.npz, converted.npz; git-ignored) and Fashion-MNIST in .carry/fmnist:
#   1. every GPU test, missing GPU = failure, in three parallel groups (compiling kernels is
#      most of their time);
#   2. alone on the GPU: the end-to-end benchmark (compiled model against cuBLAS fp32/fp16
#      and a torch fp16 CUDA graph, CPU == GPU checked by the tests) and each frontier
#      point's chain at batch 1 and 65536.
# Logs go to $OUT (default ./device_out); the summary is printed last.
set -u
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export NIMBUS_FASHION_MNIST=${NIMBUS_FASHION_MNIST:-$PWD/.carry/fmnist} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail -5 "$OUT/install.log"; exit 1; }
i=0
for group in "tests/arrays/test_cuda.py tests/arrays/test_runtime_cuda.py" \
    "tests/arrays/test_kernels.py tests/nn" \
    "$(ls tests/arrays/test_*.py | grep -v -e test_cuda.py -e test_kernels.py -e test_runtime_cuda.py | tr '\n' ' ') tests/strategies tests/test_api.py"; do
  timeout 400 python3 -m pytest -q -rs -m gpu --require-gpu -p no:cacheprovider $group \
    > "$OUT/gpu_tests_$i.log" 2>&1 &
  i=$((i + 1))
done
wait
CONVERTED=${CONVERTED:-.carry/e2e/converted44.npz}   # the default recipe's model
if [ -f "$CONVERTED" ]; then
  timeout 200 python3 benchmarks/bench_e2e.py --float .carry/e2e/float.npz \
    --converted "$CONVERTED" --gpu --no-cpu --json "$OUT/e2e_gpu.json" \
    > "$OUT/e2e_gpu.log" 2>&1
fi
timeout 120 python3 benchmarks/bench_frontier.py --no-cpu --gpu --points 4x4 5x4 4x2 6x8 \
  --json "$OUT/frontier_gpu.json" > "$OUT/frontier_gpu.log" 2>&1
for f in "$OUT"/gpu_tests_*.log; do
  echo "$(basename "$f"): $(grep -E '[0-9]+ (passed|failed)' "$f" | tail -1)"
  grep -E "^(FAILED|ERROR)" "$f" | head -10
done
grep -A12 "^### GPU" "$OUT/e2e_gpu.log" 2>/dev/null
tail -8 "$OUT/frontier_gpu.log"
