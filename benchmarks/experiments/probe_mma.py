"""Where chain_mma_kernel's time goes: the default chain's shapes at N = 65536, with parts of
the kernel cut out by editing its source (timings only; the outputs of the cut variants are
wrong by construction).

    python3 benchmarks/experiments/probe_mma.py
"""
import sys

import numpy as np

sys.path.insert(0, "benchmarks/experiments")
from bench_runtime_cuda import SIZES, make_layers, time_calls  # noqa: E402

import nimbus.arrays.kernels.runtime_cuda as rc  # noqa: E402

CUTS = {
    "full": [],
    "no encode": [("        if (l == 0) encode4<true>", "        if (0) encode4<true>"),
                  ("        else encode4<false>(ly, act", "        else if (0) encode4<false>(ly, act")],
    "no mma": [("                                mma_u8(acc[i][2 * p], a[i], b.x, b.y);\n"
                "                                mma_u8(acc[i][2 * p + 1], a[i], b.z, b.w);",
                "                                acc[i][2 * p][0] += a[i][0] ^ b.x ^ b.y;\n"
                "                                acc[i][2 * p + 1][0] += a[i][1] ^ b.z ^ b.w;")],
    "no lut wait": [("                async_wait_prev();\n            } else {\n                async_wait_all();\n            }\n            __syncthreads();      // chunk ch",
                     "            }\n            __syncthreads();      // chunk ch")],
    "no mma loop": [("            if (busy) {\n                const u8* buf", "            if (0) {\n                const u8* buf")],
}


def main():
    import cupy as cp
    rng = np.random.default_rng(0)
    N = 65536
    X = cp.asarray(rng.standard_normal((N, SIZES[0])).astype(np.float32))
    src = rc._source()
    for dpc in (4,):
        lay = make_layers(rng, dpc, 16)
        # local trees, as a converted model has (codebook c reads columns dpc c .. dpc c + dpc - 1)
        loc = [dict(l) for l in lay]
        for l in loc:
            C = l["dims"].shape[0]
            D = C * dpc
            l["dims"] = (np.arange(C)[:, None] * dpc + rng.integers(0, dpc, l["dims"].shape)) % D
        for tag, layers in (("random trees", lay), ("local trees", loc)):
            for name, cuts in CUTS.items():
                if name in ("no mma", "no lut wait"):
                    continue
                s = src
                for a, b in cuts:
                    assert s.count(a) == 1, (name, a)
                    s = s.replace(a, b)
                rc._SOURCE = s
                rc._modules.clear()
                for rows in ((128, 64, 32) if name == "full" else (128, 64)):
                    ch = rc.ChainCUDA(layers, in_features=SIZES[0], kernel="mma", rows=rows)
                    d, w = time_calls(cp, lambda: ch(X, check_finite=False), 20)
                    print(f"{dpc} dims/cb, {tag}, rows {rows}, {name}: {d:.4f} ms", flush=True)
    rc._SOURCE = src


def kernels_only():
    """A few calls per (kernel, N) for Nsight Compute to time the kernels alone:
    ncu --metrics gpu__time_duration.sum python3 probe_mma.py --ncu"""
    import cupy as cp
    rng = np.random.default_rng(0)
    lay = make_layers(rng, 4, 16)
    for kernel in ("simt", "mma"):
        ch = rc.ChainCUDA(lay, in_features=SIZES[0], kernel=kernel)
        for N in (1, 256, 4096, 65536):
            X = cp.asarray(rng.standard_normal((N, SIZES[0])).astype(np.float32))
            for _ in range(3):
                ch(X)
    cp.cuda.get_current_stream().synchronize()


if __name__ == "__main__" and "--ncu" in sys.argv:
    kernels_only()
elif __name__ == "__main__":
    main()
