# One device run: the GPU chain's tests, bench_e2e --gpu, and ncu's per-instruction stall
# samples of chain_kernel at batch 1 (sampling every 32 cycles); logs in $OUT.
set -u
export PYTHONPATH=$PWD NIMBUS_FASHION_MNIST=$PWD/.carry/fmnist PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -q -x -m gpu --require-gpu -p no:cacheprovider tests/arrays/test_runtime_cuda.py tests/nn/test_runtime.py > $OUT/t_runtime.log 2>&1
tail -2 $OUT/t_runtime.log; grep -E "^(FAILED|ERROR)" $OUT/t_runtime.log | head
timeout 200 python3 benchmarks/bench_e2e.py --float .carry/e2e/float.npz --converted .carry/e2e/converted44.npz --gpu --no-cpu --json $OUT/e2e_gpu.json > $OUT/e2e_gpu.log 2>&1
grep -A9 "^Device time" $OUT/e2e_gpu.log; grep -A9 "^Host wall" $OUT/e2e_gpu.log
timeout 100 ncu --cache-control none --clock-control none --warp-sampling-interval 0 --section SourceCounters --section WarpStateStats --import-source no -k regex:chain -s 2 -c 1 -o $OUT/rep_1 python3 benchmarks/experiments/ncu_chain.py 1 > $OUT/ncu_1.log 2>&1
ncu --import $OUT/rep_1.ncu-rep --page source --print-source sass --csv > $OUT/sass_1.csv 2> $OUT/sass_1.err
rm -f $OUT/*.ncu-rep
