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
    "no encode": [("if (ts) encode_pairs<false, true>(ly, act, XS, xn, codes + 2 * x0, Rs, tbuf);", "if (ts) {}"),
                  ("if (ts) encode_pairs<false, true>(ly, act, Hs, nr, codes, Rs, tbuf);", "if (ts) {}")],
    "no mma loop": [("            if (busy) {\n                const u8* buf", "            if (0) {\n                const u8* buf")],
    "no lut copy": [("        stage_n(lutbuf, ly.lutb, SB * step_bytes);", ""),
                    ("                stage_n(lutbuf + ((ch + 1) & 1) * chunk_bytes,",
                     "                if (0) stage_n(lutbuf + ((ch + 1) & 1) * chunk_bytes,")],
    "no lut copy, no mma loop": [],
}
CUTS["no lut copy, no mma loop"] = CUTS["no lut copy"] + CUTS["no mma loop"]


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
        for tag, layers in (("local trees", loc),):
            for name, cuts in CUTS.items():
                s = src
                for a, b in cuts:
                    assert s.count(a) == 1, (name, a)
                    s = s.replace(a, b)
                rc._SOURCE = s
                rc._modules.clear()
                for rows in (128,):
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
        for N in ((1, 16, 256, 4096) if kernel == "simt" else (4096, 65536)):
            X = cp.asarray(rng.standard_normal((N, SIZES[0])).astype(np.float32))
            for _ in range(3):
                ch(X)
    cp.cuda.get_current_stream().synchronize()


if __name__ == "__main__" and "--ncu" in sys.argv:
    kernels_only()
elif __name__ == "__main__":
    main()
