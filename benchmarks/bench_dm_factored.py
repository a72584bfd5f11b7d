"""Factored DM layer step: leaf gradients through the factors against the LUT product.

A DM layer with ``lut_form="factored"`` has ``lut[c] = proto[c] @ weight[cols[c]]``.
Its backward needs the leaf gradients ``G = grad_Y @ LUT_flat^T`` (N x C*K, N*C*K*M
multiply-adds); through the factors they are ``(grad_Y @ weight^T)[:, cols[c]] @
proto[c]^T`` (N*D*M + N*C*K*w). This script times one training step of the layer
(``DM.forward`` + ``backward`` through autograd, every parameter trained, batch N) both
ways (``DMFunction`` with and without ``factors``), at the shapes of the Fashion-MNIST MLP's
layers (depth-8 trees, 8 columns per codebook), checks that the two give the same
gradients, and times the two leaf-gradient computations alone. ``kernels.dm_backward`` uses
the factors on the CPU where M >= 4w and never on the GPU, so there the two steps are the
same computation and only the "G" columns differ.

Timing: ``time.perf_counter`` around each step on the CPU; on the GPU (``--gpu``) CUDA
events; warm-up, median of ``--reps`` steps.

Usage: ``python benchmarks/bench_dm_factored.py [--gpu] [--n 256] [--depth 8]``
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nimbus.arrays import backend  # noqa: E402
from nimbus.arrays.autograd import Tensor  # noqa: E402
from nimbus.strategies import DM  # noqa: E402
from nimbus.arrays.kernels import dm_reference  # noqa: E402
from nimbus.strategies.dm import DMFunction, FactoredLUT  # noqa: E402
from nimbus.table import Table  # noqa: E402

SHAPES = [(784, 256), (256, 256), (256, 10)]       # (D, M) of the MLP's four Linear layers


def _step_timer(xp):
    if xp is np:
        def run(fn):
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)
        return run
    cp = xp

    def run(fn):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end)
    return run


def _step(dm, x, gY, factored):
    """One training step of the layer as DM.forward makes it, with or without handing the
    backward the LUT's factors."""
    thr, proto, weight = dm.parameters()
    factors = (proto.data, weight.data, dm.cols_, dm.colmask_) if factored else None

    def step():
        for t in (thr, proto, weight):
            t.grad = None
        lut = FactoredLUT.apply(proto, weight, cols=dm.cols_, mask=dm.colmask_)
        Y = DMFunction.apply(x, thr, lut, dims=dm.dims_, inv_tau=dm.inv_tau(),
                             inv_temp=1.0 / dm.temperature, factors=factors)
        (Y * Tensor(gY)).sum().backward()
        return [t.grad for t in (thr, proto, weight)]
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="CuPy arrays (CUDA events)")
    p.add_argument("--n", type=int, default=256, help="rows per step (default 256)")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    if args.gpu and not backend.has_cuda():
        raise SystemExit("error: --gpu needs CuPy and a CUDA device")
    rng = np.random.default_rng(0)
    rows = []
    for D, M in SHAPES:
        rows_fit = max(4096, 2 ** args.depth * 8)
        A = np.maximum(0, rng.standard_normal((rows_fit, D))).astype(np.float32)
        B = (rng.standard_normal((D, M)) / np.sqrt(D)).astype(np.float32)
        if args.gpu:
            A, B = backend.to_device(A), backend.to_device(B)
        xp = backend.namespace(A)
        dm = DM(D // 8, depth=args.depth, init="maddness", lut_form="factored",
                init_params={"refine": 0}, random_state=0).fit(A, B)
        x = Tensor(A[:args.n])
        gY = xp.asarray(rng.standard_normal((args.n, M)).astype(np.float32))
        timer = _step_timer(xp)
        grads, times = {}, {}
        for way in ("factored", "LUT product"):
            step = _step(dm, x, gY, way == "factored")
            for _ in range(3):
                step()
            times[way] = float(np.median([timer(step) for _ in range(args.reps)]))
            grads[way] = [backend.to_host(g) for g in step()]
        # the leaf gradients alone, both ways (on the GPU kernels.dm_backward ignores the
        # factors: these two columns say why)
        f = (dm.proto_, dm.weight_, dm.cols_, dm.colmask_)
        g_times = {}
        for way, fn in (("G factored", lambda: dm_reference.factored_leaf_gradients(gY, *f)),
                        ("G product", lambda: dm_reference.leaf_gradients(gY, dm.lut_))):
            for _ in range(3):
                fn()
            g_times[way] = float(np.median([timer(fn) for _ in range(args.reps)]))
        err = max(float(np.abs(a - b).max() / (np.abs(b).max() or 1.0))
                  for a, b in zip(grads["factored"], grads["LUT product"]))
        rows.append({"D": D, "M": M, "C": D // 8, "K": 2 ** args.depth,
                     "factored ms": times["factored"], "LUT product ms": times["LUT product"],
                     "speed-up": times["LUT product"] / times["factored"],
                     "G factored ms": g_times["G factored"], "G product ms": g_times["G product"],
                     "max rel. grad diff": err})
        if err > 1e-4:
            raise SystemExit(f"gradients differ by {err:.2e} (relative) at D={D}, M={M}")
    where = "GPU" if args.gpu else "CPU"
    print(Table(rows, ["D", "M", "C", "K", "factored ms", "LUT product ms", "speed-up",
                       "G factored ms", "G product ms", "max rel. grad diff"],
                title=f"factored DM layer step ({where}, N={args.n}, median of {args.reps})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
