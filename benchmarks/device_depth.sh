#!/usr/bin/env bash
# One device run for trees of any depth (1..8) and LUTs of any K (run from the repository
# root on the GPU machine): install, the GPU kernel tests, compute-sanitizer memcheck over
# the any-depth / any-K tests (at the same time as the tests), kernel times per depth, and
# the bench_gpu headline (alone on the GPU).
#   bash benchmarks/device_depth.sh [tests] [sanitize] [time] [bench]   (default: all four)
# Logs go to $OUT (default ./device_out); a summary is printed last.
set -u
OUT=${OUT:-device_out}; mkdir -p "$OUT"
STEPS=" ${*:-tests sanitize time bench} "
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 \
  || { cp /tmp/install.log "$OUT/"; echo "install failed"; tail -5 /tmp/install.log; exit 1; }
SUMMARY="$OUT/summary.txt"; : > "$SUMMARY"

sanitize() {
  # the new kernels: other depths, other K, the L1/L2 fallbacks, the warp DM backward
  NIMBUS_NO_CUPY_POOL=1 timeout 300 compute-sanitizer --tool memcheck --error-exitcode 99 \
    python3 -m pytest -q -p no:cacheprovider --require-gpu -m gpu tests/arrays/test_cuda.py \
    tests/arrays/test_kernels.py tests/nn/test_dm.py \
    -k "any_depth or any_k or global_reads or past_k or depth8" > "$OUT/sanitizer.log" 2>&1
  echo "sanitizer rc=$?: $(grep -E '[0-9]+ (passed|failed)' "$OUT/sanitizer.log" | tail -1) |" \
       "$(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)" > /tmp/sanitizer_summary.txt
}

tests() {
  # three pytest processes at once (kernel compilation is most of the time)
  local i=0 group f
  for group in tests/arrays/test_cuda.py "tests/arrays/test_kernels.py tests/nn/test_dm.py" \
      "$(ls tests/arrays/test_*.py | grep -v -e test_cuda.py -e test_kernels.py | tr '\n' ' ')"; do
    python3 -m pytest -q -rs -m gpu --require-gpu -p no:cacheprovider $group \
      > "$OUT/gpu_tests_$i.log" 2>&1 &
    i=$((i + 1))
  done
  wait
  for f in "$OUT"/gpu_tests_*.log; do
    echo "gpu tests $(basename "$f"): $(tail -1 "$f")" >> "$SUMMARY"
    grep -E "^(FAILED|ERROR)" "$f" | head -20 >> "$SUMMARY"
  done
}

depth_times() {
  python3 - > "$OUT/depth_times.txt" 2>&1 <<'EOF'
# Median CUDA-event times (ms) of each kernel per tree depth; inputs random normal.
import numpy as np, cupy as cp
from nimbus.arrays.kernels import cuda, dm_cuda

def t(fn, reps=20):
    fn(); cp.cuda.Device().synchronize()
    s, e, out = cp.cuda.Event(), cp.cuda.Event(), []
    for _ in range(reps):
        s.record(); fn(); e.record(); e.synchronize()
        out.append(cp.cuda.get_elapsed_time(s, e))
    return float(np.median(out))

rng = np.random.default_rng(0)
N, D, C, M = 65536, 512, 16, 512
A = cp.asarray(rng.standard_normal((N, D)).astype(np.float32))
print(f"N={N} D={D} C={C} M={M} (lookups); backward N=8192; DM backward N=8192, C=16, M=128")
print("depth     K  encode  lookup_q  lookup_f32  lookup_bwd  dm_backward")
for d in range(1, 9):
    K, nn = 2 ** d, 2 ** d - 1
    dims = cp.asarray(rng.integers(0, D, (C, nn)).astype(np.int32))
    thr = cp.asarray((0.5 * rng.standard_normal((C, nn))).astype(np.float32))
    codes = cuda.encode_tree(A, dims, thr)
    q = cp.asarray(rng.integers(0, 256, (C, K, M)).astype(np.uint8))
    sc, bi = cp.ones(M, np.float32), cp.zeros(M, np.float32)
    lut = cp.asarray(rng.standard_normal((C, K, M)).astype(np.float32))
    g = cp.asarray(rng.standard_normal((8192, M)).astype(np.float32))
    te = t(lambda: cuda.encode_tree(A, dims, thr, check_finite=False))
    tq = t(lambda: cuda.lookup_q(codes, q, sc, bi))
    tf = t(lambda: cuda.lookup(codes, lut))
    tb = t(lambda: cuda.lookup_backward(codes[:8192], g, K))
    A2, lut2, g2 = A[:8192], lut[:, :, :128].copy(), g[:, :128].copy()
    tau = cp.ones((C, nn), np.float32)
    c2, _ = dm_cuda.dm_forward(A2, dims, thr, lut2)
    tdm = t(lambda: dm_cuda.dm_backward(A2, dims, thr, tau, lut2, c2, g2, 0.8))
    print(f"{d:5d} {K:5d} {te:7.4f} {tq:9.4f} {tf:11.4f} {tb:11.4f} {tdm:12.4f}")
# the L1/L2 fallback (LUT tile over the shared memory) against the tile kernel
for Cg in (48, 56, 64):
    codes = cp.asarray(rng.integers(0, 256, (N, Cg)).astype(np.uint8))
    q = cp.asarray(rng.integers(0, 256, (Cg, 256, M)).astype(np.uint8))
    sc, bi = cp.ones(M, np.float32), cp.zeros(M, np.float32)
    tq = t(lambda: cuda.lookup_q(codes, q, sc, bi))
    dev = cuda.device_info(0)
    fits = any(cuda._q_config(Cg, M, dev, None, r, K=256) for r in (None, 2, 1))
    used = "shared-memory tile" if fits else "L1/L2 fallback"
    print(f"K=256 C={Cg} lookup_q {tq:.4f} ms ({used})")
EOF
  echo "depth times rc=$?" >> "$SUMMARY"; cat "$OUT/depth_times.txt" >> "$SUMMARY"
}

: > /tmp/sanitizer_summary.txt
case $STEPS in *" sanitize "*)
  case $STEPS in *" tests "*) sanitize & ;; *) sanitize ;; esac ;; esac
case $STEPS in *" tests "*) tests ;; esac
wait
cat /tmp/sanitizer_summary.txt >> "$SUMMARY"
case $STEPS in *" time "*) depth_times ;; esac
case $STEPS in *" bench "*)
  python3 benchmarks/bench_gpu.py --quick > "$OUT/bench_quick.log" 2>&1
  echo "bench_gpu --quick rc=$?" >> "$SUMMARY"; tail -25 "$OUT/bench_quick.log" >> "$SUMMARY" ;;
esac
cat "$SUMMARY"
