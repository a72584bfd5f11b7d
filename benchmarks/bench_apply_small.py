"""Per-call apply time of fitted ops on the digits task (issue 16, item 3).

``python -m nimbus compare`` times ``op(A_test)`` for A_test (400, 64) float32 and
B (64, 20): at this size a call costs tens of microseconds, so the fixed cost of a
call (validation, dispatch, thread launches) is most of it. This script fits every
method once per C, then times all of them in one process, interleaved (round-robin,
so drifting machine load hits every method alike), and prints the median per method.

    python benchmarks/bench_apply_small.py [--calls 2000] [--ncodebooks 2,4,8,16,32]
        [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000, help="timed calls per op (default 2000)")
    p.add_argument("--ncodebooks", default="2,4,8,16,32")
    p.add_argument("--methods", default="pq,maddness,joint")
    p.add_argument("--json", default=None, help="also write the medians (seconds) here")
    args = p.parse_args(argv)

    from nimbus.strategies import make
    from nimbus.nn.data import digits_task

    A_tr, A_te, B = digits_task()
    Cs = [int(c) for c in args.ncodebooks.split(",")]
    methods = args.methods.split(",")
    ops = {("exact", None): make("exact").fit(A_tr, B)}
    for m in methods:
        for C in Cs:
            ops[(m, C)] = make(m, ncodebooks=C, random_state=0).fit(A_tr, B)
    for op in ops.values():              # compile and warm every path
        for _ in range(20):
            op(A_te)
    times = {k: [] for k in ops}
    for _ in range(args.calls):          # round-robin: load changes hit every op alike
        for k, op in ops.items():
            t0 = time.perf_counter()
            op(A_te)
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ex = med[("exact", None)]
    print(f"A_test {A_te.shape}, B {B.shape}, {args.calls} calls each, median us "
          f"(ratio to exact); numba threads {nimbus_threads()}")
    print(f"{'method':<10}" + "".join(f"{'C=' + str(c):>16}" for c in Cs))
    print(f"{'exact':<10}{ex * 1e6:>16.1f}")
    for m in methods:
        print(f"{m:<10}" + "".join(f"{med[(m, c)] * 1e6:>9.1f} ({med[(m, c)] / ex:4.2f})"
                                   for c in Cs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{m}:{c}": v for (m, c), v in med.items()}, f, indent=1)


def nimbus_threads():
    import numba
    return numba.get_num_threads()


if __name__ == "__main__":
    main()
