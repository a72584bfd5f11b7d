"""The accuracy side of the operating-point frontier: Fashion-MNIST MLP converted at
several (depth, input dimensions per codebook) points, several seeds.

For each seed the float MLP (784-256-256-256-10, Linear -> BatchNorm -> ReLU, trained with
input noise as ``python -m nimbus convert`` does) is trained once and saved; every point is
converted from a fresh copy of it with the library's recipe (:data:`nimbus.nn.recipe.DEFAULT`)
at that depth and codebook width. One JSON line per (seed, point) goes to ``--out``: float and
converted test accuracy, points lost, conversion seconds, int8 LUT bytes against the float32
weights' bytes. Speed of each point is measured separately (``bench_e2e.py``,
``bench_frontier_speed.py``): it depends on the shapes only.

    python benchmarks/frontier.py --gpu --seeds 0 1 2 --points 4x2 5x4 6x8 --out frontier.jsonl

A point is DEPTHxDIM. Stops starting new conversions after ``--budget`` seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--points", nargs="+", default=["4x2", "5x4", "6x8"])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--epochs", type=int, default=25, help="float training epochs")
    ap.add_argument("--epochs-per-layer", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=12)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; no new run after")
    ap.add_argument("--out", default="frontier.jsonl")
    args = ap.parse_args(argv)

    import nimbus
    from nimbus import nn
    from nimbus.arrays import backend
    from nimbus.nn.cli import build_mlp

    t_start = time.perf_counter()
    Xtr, ytr, Xte, yte = nn.data.load_fashion_mnist()
    if args.gpu:
        Xtr, ytr, Xte, yte = (backend.to_device(a) for a in (Xtr, ytr, Xte, yte))
    sizes = [784, 256, 256, 256, 10]
    float_bytes = 4 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    points = [tuple(int(v) for v in p.split("x")) for p in args.points]
    tmp = tempfile.mkdtemp()
    paths, train_s = {}, {}
    for seed in args.seeds:            # every float model first: points then seeds
        model = build_mlp(sizes, seed=seed)
        t0 = time.perf_counter()
        nn.fit(model, Xtr, ytr, epochs=args.epochs, batch_size=256, lr=1e-3, random_state=seed,
               input_noise=0.4)
        train_s[seed] = time.perf_counter() - t0
        paths[seed] = os.path.join(tmp, f"float{seed}.npz")
        nimbus.save(model, paths[seed])
    for depth, dim in points:
        for seed in args.seeds:
            if time.perf_counter() - t_start > args.budget:
                print("budget spent: stopping", flush=True)
                return 0
            m = nimbus.load(paths[seed])
            t0 = time.perf_counter()
            rep = nn.convert(m, Xtr, ytr, depth=depth, codebook_dim=dim,
                             epochs_per_layer=args.epochs_per_layer,
                             finetune_epochs=args.finetune_epochs, validation=(Xte, yte),
                             random_state=seed)
            conv_s = time.perf_counter() - t0
            lut_bytes = sum(s["lut"].nbytes for s in nn.compile(m).steps if s["op"] == "lut")
            row = {"seed": seed, "depth": depth, "codebook_dim": dim,
                   "float_acc": rep.float_accuracy, "converted_acc": rep.final_accuracy,
                   "points_lost": 100 * (rep.float_accuracy - rep.final_accuracy),
                   "conversion_s": conv_s, "float_train_s": train_s[seed],
                   "lut_bytes": lut_bytes, "float_weight_bytes": float_bytes,
                   "lut_over_float": lut_bytes / float_bytes,
                   "device": "gpu" if args.gpu else "cpu"}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
