# One device run: the GPU tests of the runtime and of nn, then probe_small.py (the host
# cost of a small-batch call, piece by piece), then bench_e2e --gpu.
set -u
export PYTHONPATH=$PWD NIMBUS_FASHION_MNIST=$PWD/.carry/fmnist PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python3 -m pytest -q -x -m gpu --require-gpu -p no:cacheprovider tests/arrays/test_runtime_cuda.py tests/nn > $OUT/t_runtime.log 2>&1
tail -3 $OUT/t_runtime.log; grep -E "^(FAILED|ERROR)|Error" $OUT/t_runtime.log | head -5
timeout 150 python3 benchmarks/experiments/probe_small.py --calls 1000 > $OUT/probe_small.log 2>&1; cat $OUT/probe_small.log
timeout 200 python3 benchmarks/bench_e2e.py --float .carry/e2e/float.npz --converted .carry/e2e/converted44.npz --gpu --no-cpu --json $OUT/e2e_gpu.json > $OUT/e2e_gpu.log 2>&1
grep -A22 "^### GPU" $OUT/e2e_gpu.log
