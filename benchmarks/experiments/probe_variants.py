"""chain_kernel variants at small batches, one process: the kernel source of the library
against an older one (argv[1], a .cu file), each at rows 1 and 2, device ms per replay of
the captured graph (events around 300 replays) and host wall per call of the chain with
check_finite="nan" (a loop, one sync at the end). Temporary experiment."""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.getcwd())


def main():
    import cupy as cp

    import nimbus
    import nimbus.nn
    from nimbus.arrays.kernels import runtime_cuda as rc
    from nimbus.nn.runtime import _LUT_KEYS
    comp = nimbus.nn.compile(nimbus.load(".carry/e2e/converted44.npz"))
    items = [it for kind, it in comp._groups if kind == "chain"][0]
    layers = [{k: s[k] for k in _LUT_KEYS} for s in items]
    D0 = int(items[0]["in"])
    srcs = [("new", rc._source())] + [(os.path.basename(f), open(f).read()) for f in sys.argv[1:]]
    rng = np.random.default_rng(0)
    Xs = {N: cp.asarray(rng.uniform(0, 1, (N, D0)).astype(np.float32)) for N in (1, 16, 256)}
    want = {}
    stream = cp.cuda.get_current_stream()
    for rep in range(2):
        for name, src in srcs:
            rc._SOURCE = src
            rc._modules.clear()
            for rows in (1, 2):
                ch = rc.ChainCUDA(layers, in_features=D0, rows=rows, kernel="simt")
                for N in (1, 16, 256):
                    X = Xs[N]
                    out = ch(X).get()
                    ref = want.setdefault(N, out)
                    if not np.array_equal(out.view(np.uint32), ref.view(np.uint32)):
                        print(f"MISMATCH {name} rows {rows} N {N}", flush=True)
                    devs = []
                    for mode, cf in ((0, False), (2, "nan")):
                        ch(X, check_finite=cf)         # sets the plan's parameters
                        plan = ch._plan(N, D0, mode)
                        for _ in range(20):
                            plan.graph.launch(stream)
                        a, b = cp.cuda.Event(), cp.cuda.Event()
                        a.record()
                        for _ in range(300):
                            plan.graph.launch(stream)
                        b.record()
                        b.synchronize()
                        devs.append(cp.cuda.get_elapsed_time(a, b) / 300 * 1e3)
                    for _ in range(20):
                        ch(X, check_finite=False)
                    stream.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(1000):
                        ch(X, check_finite=False)
                    stream.synchronize()
                    wall = (time.perf_counter() - t0)
                    print(f"rep {rep} {name:>10} rows {rows} N {N:>3}: replay {devs[0]:6.2f} us "
                          f"(nan {devs[1]:6.2f}), call wall {wall * 1e3:6.2f} us", flush=True)


if __name__ == "__main__":
    main()
