"""Joint bucketing vs MADDNESS vs PQ: test NMSE at C = 16 and 32 on the tasks of issue 4.

    python benchmarks/bench_joint.py [--quick] [--json out.json]

Tasks: sklearn digits (ANCHORS.md), the synthetic anchor data of ANCHORS.md
(shared/anchors/synth.py, same seeds and 20000/5000 splits: gauss, lowrank, relu with
D=32, M=16 and lowrank with D=128, M=16), and the three layers of a small MLP on
Fashion-MNIST (scikit-learn MLPClassifier 784 -> 128 -> 64 -> 10, ReLU, 30 epochs on the
first 5000 training images; A = a layer's input activations on those 5000 images, tested
on the first 1000 test images; B = the layer's weights).

Methods, all with an 8-bit LUT: pq (random_state=0), maddness (defaults), joint (defaults:
split="node"), joint with split="level"; and, to separate bucketing from quantizing, the
fitted MADDNESS LUT re-quantized with joint's 8-bit quantizer (a scale per output
column) and the fitted joint LUT with MADDNESS's (one shared scale). Prints a markdown table with the test NMSE of each, joint / maddness,
fit times, and the checks of issue 4: joint <= 1.02 x maddness on
every task, geometric mean of joint / maddness <= 0.8, split="node" <= 1.02 x "level".
``--quick`` runs digits and relu only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import nimbus  # noqa: E402
from nimbus.arrays import kernels  # noqa: E402
from nimbus.nn.data import digits_task, load_fashion_mnist  # noqa: E402
from nimbus.strategies._lut import quantize_lut, quantize_lut_per_column  # noqa: E402
from tests.anchor_data import make_data  # noqa: E402  (shared/anchors/synth.py's data)

METHODS = [("pq", "pq", {"random_state": 0}), ("maddness", "maddness", {}),
           ("joint", "joint", {}), ("joint_level", "joint", {"split": "level"})]


def fashion_layers(n_train=5000, n_test=1000):
    """(name, A_train, A_test, B) for each layer of a small MLP on Fashion-MNIST."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    X_tr, y_tr, X_te, y_te = load_fashion_mnist(n_train=n_train, n_test=n_test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier((128, 64), max_iter=30, random_state=0).fit(X_tr, y_tr)
    print(f"Fashion-MNIST MLP test accuracy: {mlp.score(X_te, y_te):.3f}", file=sys.stderr)
    out, a_tr, a_te = [], X_tr, X_te
    for i, (W, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_)):
        out.append((f"fmnist L{i + 1} ({W.shape[0]},{W.shape[1]})", a_tr.astype(np.float32),
                    a_te.astype(np.float32), W.astype(np.float32)))
        a_tr, a_te = np.maximum(a_tr @ W + b, 0), np.maximum(a_te @ W + b, 0)
    return out


def tasks(quick=False):
    yield ("digits (64,20)",) + tuple(digits_task())
    kinds = [("relu", 32)] if quick else [("gauss", 32), ("lowrank", 32), ("relu", 32),
                                           ("lowrank", 128)]
    for kind, D in kinds:
        yield (f"{kind} ({D},16)",) + make_data(kind, 20000, 5000, D, 16)
    if not quick:
        yield from fashion_layers()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits and relu only")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    rows = []
    for name, A_tr, A_te, B in tasks(args.quick):
        Y = A_te @ B
        for C in (16, 32):
            if C > A_tr.shape[1]:
                continue
            r = {"task": name, "C": C}
            for key, method, kw in METHODS:
                t0 = time.perf_counter()
                op = nimbus.fit(A_tr, B, method, C, **kw)
                r[key + "_fit_s"] = time.perf_counter() - t0
                r[key] = nimbus.nmse(Y, op(A_te))
                # the same fitted LUT under the other 8-bit quantizer (joint: a scale per
                # output column; pq/maddness: one shared scale), to separate the
                # bucketing from the quantizer
                if key in ("joint", "maddness"):
                    other = quantize_lut if key == "joint" else quantize_lut_per_column
                    q, scale, bias = other(op.lut_)
                    r[key + "_other8"] = nimbus.nmse(Y, kernels.lookup_q(op.encode(A_te), q,
                                                                         scale, bias))
            r["ratio"] = r["joint"] / r["maddness"]
            rows.append(r)
            print(f"{name} C={C}: pq {r['pq']:.4f} maddness {r['maddness']:.4f} joint "
                  f"{r['joint']:.4f} (level {r['joint_level']:.4f}) ratio {r['ratio']:.2f}",
                  file=sys.stderr, flush=True)
    print("| task (D, M) | C | PQ | MADDNESS | joint | joint / MADDNESS | joint, level splits "
          "| MADDNESS, per-column 8-bit | joint, shared 8-bit | fit s: PQ | MADDNESS | joint |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['C']} | {r['pq']:.4f} | {r['maddness']:.4f} | "
              f"{r['joint']:.4f} | {r['ratio']:.2f} | {r['joint_level']:.4f} | "
              f"{r['maddness_other8']:.4f} | {r['joint_other8']:.4f} | {r['pq_fit_s']:.1f} | "
              f"{r['maddness_fit_s']:.1f} | {r['joint_fit_s']:.1f} |")
    ratios = np.array([r["ratio"] for r in rows])
    geo = float(np.exp(np.mean(np.log(ratios))))
    worst = max(rows, key=lambda r: r["ratio"])
    node_vs_level = max(rows, key=lambda r: r["joint"] / r["joint_level"])
    print()
    print(f"geometric mean of joint / MADDNESS over {len(rows)} (task, C): {geo:.3f} "
          f"(issue 4: <= 0.8; aim 0.7)")
    print(f"worst joint / MADDNESS: {worst['ratio']:.3f} ({worst['task']}, C={worst['C']}) "
          f"(issue 4: <= 1.02)")
    def gm(a, b):
        return float(np.exp(np.mean([np.log(r[a] / r[b]) for r in rows])))
    print(f"same quantizer for both (geometric means of joint / MADDNESS): shared 8-bit "
          f"scale {gm('joint_other8', 'maddness'):.3f}, per-column 8-bit scale "
          f"{gm('joint', 'maddness_other8'):.3f}")
    print(f"worst joint node / level: {node_vs_level['joint'] / node_vs_level['joint_level']:.3f}"
          f" ({node_vs_level['task']}, C={node_vs_level['C']}) (issue 4: <= 1.02)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    ok = geo <= 0.8 and worst["ratio"] <= 1.02 and \
        node_vs_level["joint"] <= 1.02 * node_vs_level["joint_level"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
