#!/usr/bin/env bash
# One device run of the GPU checks (run from the repository root on the GPU machine):
# every GPU test with a missing GPU an error, then compute-sanitizer memcheck over the
# kernel tests in parallel shards. Logs go to $OUT (default ./device_out).
#   bash benchmarks/device_checks.sh [sanitizer seconds per shard, default 300] [shards, default 4]
# SKIP_TESTS=1 runs the sanitizer part only.
set -u
OUT=${OUT:-device_out}; mkdir -p "$OUT"
LIMIT=${1:-300}; SHARDS=${2:-4}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -q -rs -m gpu --require-gpu tests > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?" | tee -a "$OUT/gpu_tests.log"; tail -3 "$OUT/gpu_tests.log"
fi
# kernel tests only; the 2-million-row test and GPU fitting are too slow under memcheck
python3 -m pytest --collect-only -q -m gpu tests/arrays/test_kernels.py tests/arrays/test_cuda.py \
    -k "not many_rows and not fit_on_cupy and not fitted_maddness" 2>/dev/null | grep '::' > "$OUT/san_ids.txt"
echo "sanitizer: $(wc -l < "$OUT/san_ids.txt") tests in $SHARDS shards, ${LIMIT}s each"
for s in $(seq 0 $((SHARDS - 1))); do
  awk -v s="$s" -v n="$SHARDS" 'NR % n == s' "$OUT/san_ids.txt" > "$OUT/san_ids_$s.txt"
  NIMBUS_NO_CUPY_POOL=1 timeout "$LIMIT" compute-sanitizer --tool memcheck --error-exitcode 99 \
    python3 -m pytest -q -p no:cacheprovider --require-gpu $(cat "$OUT/san_ids_$s.txt") \
    > "$OUT/sanitizer_$s.log" 2>&1 &
done
wait
for s in $(seq 0 $((SHARDS - 1))); do
  echo "shard $s: $(grep -E 'passed|failed|error' "$OUT/sanitizer_$s.log" | tail -1) |" \
       "$(grep -E 'ERROR SUMMARY' "$OUT/sanitizer_$s.log" | tail -1)"
done
