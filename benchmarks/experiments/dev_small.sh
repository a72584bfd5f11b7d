set -u
export PYTHONPATH=$PWD NIMBUS_FASHION_MNIST=$PWD/.carry/fmnist PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python3 -m pytest -q -x -m gpu --require-gpu -p no:cacheprovider tests/arrays/test_runtime_cuda.py tests/nn/test_runtime.py > $OUT/t_runtime.log 2>&1 &
timeout 300 python3 -m pytest -q -m gpu --require-gpu -p no:cacheprovider tests/arrays/test_cuda.py > $OUT/t_strat.log 2>&1 &
wait
tail -3 $OUT/t_runtime.log; tail -3 $OUT/t_strat.log
timeout 120 python3 benchmarks/experiments/probe_small.py > $OUT/probe_small.log 2>&1; cat $OUT/probe_small.log
timeout 200 python3 benchmarks/bench_e2e.py --float .carry/e2e/float.npz --converted .carry/e2e/converted44.npz --gpu --no-cpu --json $OUT/e2e_gpu.json > $OUT/e2e_gpu.log 2>&1
grep -A14 "^### GPU" $OUT/e2e_gpu.log
