# ncu source-level (SASS) warp-stall sampling of the default model's chain at batch 1 and
# 65536: per-instruction samples as CSV in $OUT (then summed by hand).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1
for N in 1 65536; do
timeout 200 ncu --cache-control none --clock-control none --section SourceCounters --section WarpStateStats --import-source no -k regex:chain -s 2 -c 1 -o $OUT/rep_$N python3 benchmarks/experiments/ncu_chain.py $N > $OUT/ncu_$N.log 2>&1
ncu --import $OUT/rep_$N.ncu-rep --page source --print-source sass --csv > $OUT/sass_$N.csv 2> $OUT/sass_$N.err
ls -la $OUT/sass_$N.csv; head -3 $OUT/sass_$N.csv | cut -c1-600; tail -2 $OUT/sass_$N.err
done
rm -f $OUT/*.ncu-rep
