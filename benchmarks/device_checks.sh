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
SAN=$(mktemp -d)
python3 -m pytest --collect-only -q -m gpu tests/arrays/test_kernels.py tests/arrays/test_cuda.py \
    -k "not many_rows and not fit_on_cupy and not fitted_maddness" 2>/dev/null | grep '::' > "$SAN/ids.txt"
echo "sanitizer: $(wc -l < "$SAN/ids.txt") tests in $SHARDS shards, ${LIMIT}s each" | tee "$OUT/sanitizer.txt"
for s in $(seq 0 $((SHARDS - 1))); do
  awk -v s="$s" -v n="$SHARDS" 'NR % n == s' "$SAN/ids.txt" > "$SAN/ids_$s.txt"
  NIMBUS_NO_CUPY_POOL=1 timeout "$LIMIT" compute-sanitizer --tool memcheck --error-exitcode 99 \
    python3 -m pytest -q -p no:cacheprovider --require-gpu $(cat "$SAN/ids_$s.txt") \
    > "$SAN/shard_$s.log" 2>&1 &
done
wait
for s in $(seq 0 $((SHARDS - 1))); do
  echo "shard $s: $(grep -E '[0-9]+ (passed|failed)' "$SAN/shard_$s.log" | tail -1) |" \
       "$(grep -E 'ERROR SUMMARY' "$SAN/shard_$s.log" | tail -1)" | tee -a "$OUT/sanitizer.txt"
done
cat "$SAN"/shard_*.log > "$OUT/sanitizer_all.log"
