# One device run: the runtime's GPU tests, then chain_kernel's source against older ones
# (probe_variants.py, args: .cu files that fit the library's host code), then ncu
# per-instruction samples of the library's kernel at batch 256 (check_finite False and
# "nan", or the modes in NCU_MODES, "" for none; summaries printed, a CSV in $OUT), then
# bench_e2e --gpu.
set -u
export PYTHONPATH=$PWD NIMBUS_FASHION_MNIST=$PWD/.carry/fmnist PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python3 -m pytest -q -x -m gpu --require-gpu -p no:cacheprovider tests/arrays/test_runtime_cuda.py tests/nn/test_runtime.py > $OUT/t_runtime.log 2>&1
tail -3 $OUT/t_runtime.log; grep -E "^(FAILED|ERROR)|Error" $OUT/t_runtime.log | head -5
timeout 200 python3 benchmarks/experiments/probe_variants.py "$@" > $OUT/probe.log 2>&1; cat $OUT/probe.log
for mode in ${NCU_MODES-false nan}; do
CHECK=$mode timeout 150 ncu --cache-control none --clock-control none --section SourceCounters --section WarpStateStats --section LaunchStats --section SpeedOfLight --import-source no -k regex:chain -s 2 -c 1 -o /tmp/rep_$mode python3 benchmarks/experiments/ncu_chain.py 256 > /tmp/ncu_$mode.log 2>&1
ncu --import /tmp/rep_$mode.ncu-rep --page details > $OUT/details_$mode.txt 2>&1
grep -E "Duration|Registers|Shared Memory Config|Dynamic Shared|Block Limit|Achieved Occ|Elapsed Cycles|SM Frequency" $OUT/details_$mode.txt | head -20
ncu --import /tmp/rep_$mode.ncu-rep --page source --print-source sass --csv > /tmp/sass_$mode.csv 2> /tmp/sass_$mode.err
python3 benchmarks/experiments/ncu_top.py /tmp/sass_$mode.csv 25 > $OUT/top_$mode.txt 2>&1; head -30 $OUT/top_$mode.txt
done
[ -f /tmp/sass_false.csv ] && cp /tmp/sass_false.csv $OUT/sass_256.csv
timeout 200 python3 benchmarks/bench_e2e.py --float .carry/e2e/float.npz --converted .carry/e2e/converted44.npz --gpu --no-cpu --json /tmp/e2e_gpu.json > $OUT/e2e_gpu.log 2>&1
grep -A22 "^### GPU" $OUT/e2e_gpu.log
