"""Few training rows: test NMSE of pq, maddness and joint with 50-1000 training rows (issue 17).

    python benchmarks/bench_small.py [--quick] [--json out.json] [--seeds S]

Tasks (each: a pool of rows, a fixed test set of ``N_TEST`` rows, and B):

* ``digits (64,20)``: sklearn digits, B of the published digits task (``digits_task``);
* ``fmnist (784,32)``: Fashion-MNIST image rows; B = the top 16 principal directions of
  other images next to 16 Gaussian columns (an encoder layer's mix of structure and noise);
* ``patch4 (16,16)``, ``patch7 (49,24)``: 4x4 and 7x7 patches of Fashion-MNIST images at
  random places, B = Gaussian filters (a convolution's im2col product);
* ``lowrank (128,24)``: rank-8 rows plus 0.1 Gaussian noise (the spectrum of hidden
  activations), B Gaussian;
* ``heavy (64,16)``: Student-t rows of 2.5 degrees of freedom with a column scale that
  varies 30x (heavy-tailed columns), B Gaussian.

For every task, N in (50, 100, 200, 500, 1000) training rows drawn from the pool with
seed s, and C in (2, 4, 8, 16, 32, 64) with C <= D, the test NMSE (``nimbus.nmse``,
8-bit LUTs, default parameters; pq with ``random_state=s``) of pq, maddness and joint.
Prints a markdown table of the means over seeds with joint / maddness, what joint kept per
seed (:func:`choice_label`: "maddness" for MADDNESS's own fit, else its trees, M or J,
and LUT model, e.g. "M-node0.5"), and the checks of issue 17:

* joint <= 1.02 x maddness at every (task, N, C) (means over seeds);
* geometric mean of joint / maddness over all (task, N, C) <= 0.9;
* every method's NMSE < 1 everywhere.

With ``--json`` the per-seed rows are written too, so that two runs (e.g. before and after
a change, with PYTHONPATH pointing at the other checkout) can be compared with
``--compare before.json after.json``: maddness after / before per (task, N), geometric
mean over C and seeds.

``--quick``: one seed, N in (50, 200, 1000), C in (4, 16), four tasks: about a minute.
The full run (2 seeds, 330 (task, N, C, seed)) takes 10-20 minutes on 2 busy cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

if "PYTHONPATH" not in os.environ:      # run from the repository without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import nimbus  # noqa: E402

NS = (50, 100, 200, 500, 1000)
CS = (2, 4, 8, 16, 32, 64)
N_TEST = 500
METHODS = ("pq", "maddness", "joint")


# ------------------------------------------------------------------------- tasks
def _digits():
    from nimbus.nn.data import digits_task
    A_tr, A_te, B = digits_task()
    return np.concatenate([A_tr, A_te]).astype(np.float32), B.astype(np.float32)


def _fmnist_images(n):
    from nimbus.nn.data import load_fashion_mnist
    X, _, _, _ = load_fashion_mnist(n_train=n, n_test=1)
    return X.reshape(n, 28, 28).astype(np.float32)


def _fmnist_rows():
    X = _fmnist_images(6000).reshape(6000, -1)
    pool, other = X[:3000], X[3000:]
    rng = np.random.RandomState(1)
    O = other - other.mean(axis=0)
    _, _, Vt = np.linalg.svd(O[:1500], full_matrices=False)
    B = np.concatenate([Vt[:16].T, rng.randn(784, 16) / np.sqrt(784 / 16)], axis=1)
    return pool, B.astype(np.float32)


def _patches(w, M, n=4000):
    imgs = _fmnist_images(n)
    rng = np.random.RandomState(2 + w)
    i = rng.randint(0, 28 - w + 1, n)
    j = rng.randint(0, 28 - w + 1, n)
    P = np.stack([imgs[k, i[k]:i[k] + w, j[k]:j[k] + w].ravel() for k in range(n)])
    return P.astype(np.float32), rng.randn(w * w, M).astype(np.float32)


def _lowrank(n=4000, D=128, M=24, r=8):
    rng = np.random.RandomState(3)
    A = rng.randn(n, r) @ rng.randn(r, D) + 0.1 * rng.randn(n, D)
    return A.astype(np.float32), rng.randn(D, M).astype(np.float32)


def _heavy(n=4000, D=64, M=16):
    rng = np.random.RandomState(4)
    scale = np.exp(rng.uniform(0, np.log(30), D))
    A = rng.standard_t(2.5, size=(n, D)) * scale
    return A.astype(np.float32), rng.randn(D, M).astype(np.float32)


TASKS = {
    "digits (64,20)": _digits,
    "fmnist (784,32)": _fmnist_rows,
    "patch4 (16,16)": lambda: _patches(4, 16),
    "patch7 (49,24)": lambda: _patches(7, 24),
    "lowrank (128,24)": _lowrank,
    "heavy (64,16)": _heavy,
}
QUICK_TASKS = ("digits (64,20)", "patch7 (49,24)", "lowrank (128,24)", "heavy (64,16)")


def split(pool, N, seed):
    """(A_train (N, D), A_test (n, D)) float32: the last n = min(N_TEST, rows - max(NS))
    rows of the pool are the test set; the training rows are
    drawn from the rest with ``seed``."""
    n = min(N_TEST, len(pool) - max(NS))
    test = pool[-n:]
    rest = pool[:-n]
    rows = np.random.RandomState(100 + seed).choice(len(rest), N, replace=False)
    return rest[rows], test


# ------------------------------------------------------------------------ running
def choice_label(op):
    """What a fitted joint op kept, short: "maddness" (MADDNESS's fit as it is), else
    "<trees>-<LUT design><gamma>" with trees M (MADDNESS's) or J (the joint ones), e.g.
    "M-node0.5"; "joint" where no check ran."""
    choice = str(getattr(op, "choice_", "-"))
    design = getattr(op, "lut_design_", None)
    if choice != "joint" or design is None:
        return choice
    trees = "J" if getattr(op, "trees_", "joint") == "joint" else "M"
    return f"{trees}-{design}{getattr(op, 'lut_gamma_', float('nan')):g}"


def run(task_names, Ns, Cs, seeds, log=sys.stderr):
    rows = []
    for name in task_names:
        pool, B = TASKS[name]()
        D = pool.shape[1]
        for N in Ns:
            for seed in seeds:
                A_tr, A_te = split(pool, N, seed)
                Y = A_te @ B
                for C in Cs:
                    if C > D:
                        continue
                    r = {"task": name, "N": N, "C": C, "seed": seed}
                    for m in METHODS:
                        kw = {"random_state": seed} if m == "pq" else {}
                        t0 = time.perf_counter()
                        op = nimbus.fit(A_tr, B, m, C, **kw)
                        r[m + "_fit_s"] = time.perf_counter() - t0
                        r[m] = float(nimbus.nmse(Y, op(A_te)))
                        if m == "joint":
                            r["choice"] = choice_label(op)
                    rows.append(r)
                    print(f"{name} N={N} seed={seed} C={C}: " + " ".join(
                        f"{m} {r[m]:.4f}" for m in METHODS) + f" ({r['choice']})",
                        file=log, flush=True)
    return rows


def summarize(rows):
    """Means over seeds per (task, N, C): list of dicts, in the order first seen."""
    keys = []
    for r in rows:
        k = (r["task"], r["N"], r["C"])
        if k not in keys:
            keys.append(k)
    out = []
    for k in keys:
        rs = [r for r in rows if (r["task"], r["N"], r["C"]) == k]
        s = {"task": k[0], "N": k[1], "C": k[2], "seeds": len(rs)}
        for m in METHODS:
            s[m] = float(np.mean([r[m] for r in rs]))
            s[m + "_max"] = float(np.max([r[m] for r in rs]))
            s[m + "_fit_s"] = float(np.mean([r[m + "_fit_s"] for r in rs]))
        s["ratio"] = s["joint"] / s["maddness"]
        s["choice"] = ",".join(sorted({r.get("choice", "-") for r in rs}))
        out.append(s)
    return out


def report(rows):
    summ = summarize(rows)
    print("| task (D, M) | N | C | PQ | MADDNESS | joint | joint / MADDNESS | joint chose "
          "| fit s: PQ | MADDNESS | joint |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summ:
        print(f"| {s['task']} | {s['N']} | {s['C']} | {s['pq']:.4f} | {s['maddness']:.4f} | "
              f"{s['joint']:.4f} | {s['ratio']:.3f} | {s['choice']} | {s['pq_fit_s']:.2f} | "
              f"{s['maddness_fit_s']:.2f} | {s['joint_fit_s']:.2f} |")
    ratios = np.array([s["ratio"] for s in summ])
    geo = float(np.exp(np.mean(np.log(ratios))))
    worst = max(summ, key=lambda s: s["ratio"])
    top = max(max(r[m] for m in METHODS) for r in rows)
    top_row = max(rows, key=lambda r: max(r[m] for m in METHODS))
    print()
    print(f"joint / MADDNESS (means over seeds) over {len(summ)} (task, N, C): geometric "
          f"mean {geo:.3f} (issue 17: <= 0.9), worst {worst['ratio']:.3f} ({worst['task']}, "
          f"N={worst['N']}, C={worst['C']}) (issue 17: <= 1.02)")
    print(f"largest single-seed NMSE of any method: {top:.4f} ({top_row['task']}, "
          f"N={top_row['N']}, C={top_row['C']}, seed {top_row['seed']}) (issue 17: < 1)")
    for N in sorted({s["N"] for s in summ}):
        sub = [s["ratio"] for s in summ if s["N"] == N]
        print(f"  N={N}: joint / MADDNESS geometric mean {np.exp(np.mean(np.log(sub))):.3f}, "
              f"worst {max(sub):.3f}")
    fit = {m: sum(r[m + "_fit_s"] for r in rows) for m in METHODS}
    print("total fit seconds: " + ", ".join(f"{m} {fit[m]:.1f}" for m in METHODS))
    return geo <= 0.9 and worst["ratio"] <= 1.02 and top < 1.0


def compare(before, after, method="maddness"):
    """Print ``method`` after / before per (task, N): geometric mean over C and seeds."""
    def key(r):
        return (r["task"], r["N"], r["C"], r["seed"])
    b = {key(r): r[method] for r in before}
    pairs = {}
    for r in after:
        if key(r) in b:
            pairs.setdefault((r["task"], r["N"]), []).append(r[method] / b[key(r)])
    print(f"| task (D, M) | N | {method} after / before (geometric mean over C, seeds) | "
          f"worst (task, N, C, seed) |")
    print("|---|---|---|---|")
    for (task, N), v in pairs.items():
        print(f"| {task} | {N} | {np.exp(np.mean(np.log(v))):.3f} | {max(v):.3f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run of under a minute")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per (task, N) (default 2)")
    ap.add_argument("--json", default=None, help="write the per-seed rows to this file")
    ap.add_argument("--cs", type=int, nargs="+", default=list(CS), help="values of C")
    ap.add_argument("--ns", type=int, nargs="+", default=list(NS), help="values of N")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS),
                    help="task names or their first word (digits fmnist patch4 patch7 "
                         "lowrank heavy)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                    help="compare two --json files (maddness and joint) and exit")
    args = ap.parse_args(argv)
    if args.compare:
        before, after = (json.load(open(p)) for p in args.compare)
        for m in ("maddness", "joint"):
            compare(before, after, m)
            print()
        return 0
    tasks = []
    for t in args.tasks:
        match = [name for name in TASKS if name == t or name.split()[0] == t]
        if not match:
            ap.error(f"unknown task {t!r}: one of {[n.split()[0] for n in TASKS]}")
        tasks += match
    args.tasks = tasks
    if args.quick:
        rows = run(QUICK_TASKS, (50, 200, 1000), (4, 16), [0])
    else:
        rows = run(args.tasks, args.ns, args.cs, list(range(args.seeds)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if report(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
