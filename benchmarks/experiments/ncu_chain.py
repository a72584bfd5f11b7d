"""Calls of the default model's GPU chain for a profiler (ncu): batches from argv, three
calls each, check_finite=False (or the environment's CHECK: "nan", "true"), on random rows
in [0, 1).

    ncu --section WarpStateStats -k regex:chain python3 benchmarks/experiments/ncu_chain.py 1 65536
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.getcwd())


def main():
    import cupy as cp

    import nimbus
    import nimbus.nn
    model = nimbus.load(os.environ.get("CONVERTED", ".carry/e2e/converted44.npz"))
    comp = nimbus.nn.compile(model)
    check = {"nan": "nan", "true": True}.get(os.environ.get("CHECK", ""), False)
    rng = np.random.default_rng(0)
    for N in map(int, sys.argv[1:]):
        X = cp.asarray(rng.uniform(0, 1, (N, comp.n_features_in)).astype(np.float32))
        for _ in range(3):
            comp(X, check_finite=check)
        cp.cuda.get_current_stream().synchronize()


if __name__ == "__main__":
    main()
