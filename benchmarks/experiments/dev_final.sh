# One short device run: the GPU tests of the runtime (kernel and compiled model), then
# bench_e2e --gpu (3 rounds).
set -u
export PYTHONPATH=$PWD NIMBUS_FASHION_MNIST=$PWD/.carry/fmnist PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python3 -m pytest -q -m gpu --require-gpu -p no:cacheprovider tests/arrays/test_runtime_cuda.py tests/nn/test_runtime.py > $OUT/t_runtime.log 2>&1
tail -2 $OUT/t_runtime.log; grep -E "^(FAILED|ERROR)" $OUT/t_runtime.log | head -5
timeout 200 python3 benchmarks/bench_e2e.py --float .carry/e2e/float.npz --converted .carry/e2e/converted44.npz --gpu --no-cpu --json $OUT/e2e_gpu.json > $OUT/e2e_gpu.log 2>&1
sed -n '/^### GPU/,/^| model/p' $OUT/e2e_gpu.log
