"""Conversion time against depth: our layer-wise schedule vs the published one.

MLPs 784 -> [256] * H -> 10 (Linear -> BatchNorm -> ReLU) for H = 2, 4, 8, 16 hidden
layers are trained briefly (not timed) and converted with a fixed number of DM
epochs per layer, int8 LUTs and folding. Two schedules:

* ``layerwise`` (ours): layers before l run once in hard mode and are cached; layer
  l trains in DM, later layers run exact (frozen);
* ``published`` (Stella Nera): no cache, and every converted layer keeps training in
  DM at every later stage (stage l trains layers 1..l).

Reported: the conversion time (stages 2-5: per-layer DM stages, int8, fold; no
pretraining and no finetuning, which cost the same in both schedules), the time of
the per-layer stages alone, T(H)/T(2), and published/ours at each depth.

Usage::

    python benchmarks/bench_convert.py                 # Fashion-MNIST subset, CPU
    python benchmarks/bench_convert.py --gpu --rows 60000
    python benchmarks/bench_convert.py --depths 2,4 --schedules layerwise   # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import nimbus.nn as nn  # noqa: E402
from nimbus.arrays import backend  # noqa: E402
from nimbus.nn.cli import build_mlp  # noqa: E402
from nimbus.table import Table  # noqa: E402


def _data(rows, gpu):
    try:
        X, y, _, _ = nn.data.load_fashion_mnist(n_train=rows, n_test=1)
        name = "Fashion-MNIST"
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        X = rng.random((rows, 784), dtype=np.float32)
        y = (X[:, :10].argmax(axis=1)).astype(np.int64)
        name = "synthetic"
    if gpu:
        X, y = backend.to_device(X), backend.to_device(y)
    return X, y, name


def run(depths, schedules, rows, epochs, batch_size, gpu, init_rows, verbose):
    X, y, name = _data(rows, gpu)
    # warm-up: compile the kernels (Numba, CuPy) outside the timed conversions
    warm = build_mlp([784, 32, 10], seed=0)
    for schedule in schedules:
        nn.convert(warm, X[:512], y[:512], epochs_per_layer=1, finetune_epochs=0,
                   init_rows=256, schedule=schedule, random_state=0)
        warm = build_mlp([784, 32, 10], seed=0)
    results = []
    for depth in depths:
        for schedule in schedules:
            model = build_mlp([784] + [256] * depth + [10], seed=depth)
            nn.fit(model, X, y, epochs=1, batch_size=batch_size, random_state=0)
            backend.synchronize(X)
            t0 = time.perf_counter()
            report = nn.convert(model, X, y, epochs_per_layer=epochs, finetune_epochs=0,
                                batch_size=batch_size, init_rows=init_rows, schedule=schedule,
                                random_state=0, verbose=verbose)
            backend.synchronize(X)
            wall = time.perf_counter() - t0
            stages = [r["seconds"] for r in report.rows if r["stage"] == "layer"]
            row = {"hidden": depth, "layers": depth + 1, "schedule": schedule,
                   "convert_s": report.conversion_seconds, "layer_stages_s": sum(stages),
                   "first_stage_s": stages[0], "last_stage_s": stages[-1], "wall_s": wall,
                   "accuracy": report.final_accuracy}
            results.append(row)
            print(json.dumps(row), flush=True)
    return results, name


def summarize(results):
    by = {(r["schedule"], r["hidden"]): r for r in results}
    rows = []
    for (schedule, depth), r in sorted(by.items(), key=lambda kv: (kv[0][0] != "layerwise", kv[0][1])):
        base = by.get((schedule, min(d for s, d in by if s == schedule)))
        ours = by.get(("layerwise", depth))
        rows.append({"schedule": schedule, "hidden": depth, "layers": r["layers"],
                     "convert_s": r["convert_s"], "layer_stages_s": r["layer_stages_s"],
                     "first_stage_s": r["first_stage_s"], "last_stage_s": r["last_stage_s"],
                     "T/T(min)": r["convert_s"] / base["convert_s"],
                     "vs_ours": (r["convert_s"] / ours["convert_s"]) if ours else None})
    return Table(rows, ["schedule", "hidden", "layers", "convert_s", "layer_stages_s",
                        "first_stage_s", "last_stage_s", "T/T(min)", "vs_ours"],
                 title="conversion time against depth (seconds)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="2,4,8,16")
    p.add_argument("--schedules", default="layerwise,published")
    p.add_argument("--rows", type=int, default=8192, help="training rows (default 8192)")
    p.add_argument("--epochs", type=int, default=2, help="DM epochs per layer (default 2)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--init-rows", type=int, default=2048,
                   help="rows the initial trees are fitted on (default 2048)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--json", metavar="OUT.json", default=None, help="also write the rows as JSON")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    schedules = args.schedules.split(",")
    results, name = run(depths, schedules, args.rows, args.epochs, args.batch_size, args.gpu,
                        args.init_rows, args.verbose)
    where = "GPU" if args.gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"\ndata: {name}, {args.rows} rows; {args.epochs} DM epochs per layer, batch "
          f"{args.batch_size}; {where}")
    table = summarize(results)
    print(table)
    print()
    print(table.to_markdown())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
