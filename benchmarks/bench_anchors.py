"""Test NMSE of our MADDNESS and PQ against the published figures (ANCHORS.md).

    python benchmarks/bench_anchors.py

Same data, seeds and splits as the published comparison (tests/anchor_data.py);
prints a markdown table with the published value, ours, and their ratio, plus
fit times. The tests (tests/strategies/test_anchors.py) assert ours <= 1.05 x published.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import nimbus  # noqa: E402
from tests.anchor_data import DIGITS_ANCHORS, SYNTH_ANCHORS, digits_task, make_data  # noqa: E402


def _row(task, C, A_tr, A_te, B, published):
    Y = A_te @ B
    out = [task, C]
    for col, (method, kw) in enumerate([("maddness", {}), ("pq", {"random_state": 0})]):
        t0 = time.perf_counter()
        op = nimbus.fit(A_tr, B, method=method, ncodebooks=C, **kw)
        fit_s = time.perf_counter() - t0
        err = nimbus.nmse(Y, op(A_te))
        out += [published[col], err, err / published[col], fit_s]
    return out


def main():
    rows = []
    data = {}
    for (kind, D, M, C), pub in sorted(SYNTH_ANCHORS.items()):
        if (kind, D, M) not in data:
            data[kind, D, M] = make_data(kind, 20000, 5000, D, M)
        rows.append(_row(f"{kind} ({D},{M})", C, *data[kind, D, M], pub))
        print(rows[-1], flush=True)
    d = digits_task()
    for C, pub in sorted(DIGITS_ANCHORS.items()):
        rows.append(_row("digits (64,20)", C, *d, pub))
        print(rows[-1], flush=True)
    print()
    print("| data (D, M) | C | MADDNESS published | ours | ratio | fit (s) | PQ-16 published | ours | ratio | fit (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.4f} | {r[4]:.2f} | {r[5]:.1f} | "
              f"{r[6]:.3f} | {r[7]:.4f} | {r[8]:.2f} | {r[9]:.1f} |")
    ratios = np.array([[r[4], r[8]] for r in rows])
    print(f"\ngeometric-mean ratio: MADDNESS {np.exp(np.log(ratios[:, 0]).mean()):.3f}, "
          f"PQ {np.exp(np.log(ratios[:, 1]).mean()):.3f}; worst: MADDNESS "
          f"{ratios[:, 0].max():.3f}, PQ {ratios[:, 1].max():.3f}")


if __name__ == "__main__":
    main()
