"""CuPy RawKernels for the op table (NVIDIA GPUs).

Imported by :mod:`nimbus.arrays.kernels` the first time a CuPy array needs a
kernel; CuPy itself is reached only through :func:`nimbus.arrays.backend.cupy`
inside the launchers, never at import time. Each kernel is CUDA C++ held in the
``.cu``/``.cuh`` files of the ``cuda/`` folder beside this module (package data; see
:func:`source`), compiled by NVRTC on its first launch and cached per (kernel,
substitutions, device): the
substitutions are the element types (float32 or float16 input/output, float32
or float16 LUT) and compile-time sizes (codebooks, column tile, rows per
thread, tree depth, buckets per codebook), one source per kernel. Kernel
semantics are exactly those of :mod:`.reference` (codes bit for bit, sums to
float32 rounding; 8-bit LUT sums exactly in integers).

Ops
---
``encode_tree``, ``encode_pq``, ``lookup``, ``lookup_q``, ``lookup_backward`` (the
table's), plus ``encode_lookup_q``: MADDNESS applied in one kernel (tree encode
into shared memory, then the 8-bit LUT sums), so the codes never reach device
memory. ``lookup``/``lookup_q``/``encode_lookup_q`` take an ``out_dtype``
(float32 or float16) so float16 I/O needs no extra cast pass.

Trees of any depth d in 1..8 (dims (C, 2**d - 1), the depth read off the shape; each
depth a ``TREE_DEPTH`` substitution) and LUTs of any K in 1..256 buckets (K read off
the LUT; an ``NK`` substitution) are handled; depth 4 / K = 16 compile to the same code
as before other sizes existed. The fused ``encode_lookup_q`` kernels are depth 4 only
(other depths run the encode and lookup kernels). LUTs whose narrowest column tile does
not fit in shared memory are read through L1/L2 by fallback kernels.

Every launcher makes its arguments contiguous with the exact dtype, passes
scalars as ``np.int32``/``np.uint32``, checks shapes (``ValueError``/``TypeError``
naming them), reads limits (multiprocessors, shared memory) off the device and
picks another variant, or the reference, when a configuration would not fit:
a launch never fails for size. Kernels clamp every index they read from user
data (columns of A, codes), so even unchecked bad values cannot read outside
their arrays.

NaN/Inf: the encoders (``FUSED_FINITE_CHECK``) check A in the same pass that
reads it and raise ``ValueError`` like :func:`nimbus.arrays.validate.finite_or_raise`;
the raise needs one device-to-host read of a flag after the kernel (a
synchronisation). ``check_finite=False`` skips that read (the benchmark's kernel
timings do).
"""
from __future__ import annotations

import importlib.resources

import numpy as np

from .. import backend, validate
from . import reference     # the oracle as the fallback of two launchers: encode_pq (K != 16)
#                             and lookup_backward (past the grid limits)

FUSED_FINITE_CHECK = frozenset({"encode_tree", "encode_pq", "encode_lookup_q"})

NT = 256                 # threads per block of every kernel unless a config says otherwise
_LUT_TILE_BUDGET = 64 * 1024   # bytes of LUT per block that keep 2-3 blocks on an SM
_ENCODE_TILE_BUDGET = 32 * 1024  # bytes of A staged per encode block
_MAX_INT32 = 2 ** 31 - 1

# --------------------------------------------------------------------------- source
# The CUDA C++ lives in .cu/.cuh files under cuda/ (package data). One source per kernel
# family: a header of #defines (the only thing that differs between variants), the
# shared prelude (cuda/prelude.cuh, prepended by concatenation: NVRTC is given one
# string, no include path), then the family's files. No CUDA header is included (NVRTC
# needs none): half precision is handled as raw 16-bit words converted with cvt
# instructions.
_FAMILIES = {           # kernel name -> the files of its source, in order, after the prelude
    "encode_tree_tile": ("encode_tree.cu",), "encode_tree_direct": ("encode_tree.cu",),
    "encode_pq_kernel": ("encode_pq.cu",),
    "lookup_q_kernel": ("lookup_q_core.cuh", "lookup_q.cu"),
    "encode_lookup_q_kernel": ("lookup_q_core.cuh", "encode_lookup_q.cu"),
    "lookup_kernel": ("lookup.cu",),
    "lookup_backward_kernel": ("lookup_backward.cu",),
    "lookup_global_kernel": ("lookup_global.cu",),
    "spin_kernel": ("spin.cu",),
}
_PRELUDE_FILE = "prelude.cuh"
_UNROLL_PLACEHOLDER = "PRAGMA_UNROLL_C"    # replaced by the unroll pragma of UNROLL_C
_texts = {}             # file name -> its text (read once)


def load_source(filename):
    """Text of the CUDA file ``filename`` of the package's ``cuda/`` folder (cached).

    Found through :mod:`importlib.resources`, so it works from a wheel as well as from a
    source tree. Raises FileNotFoundError naming the file if the package data is missing.
    """
    text = _texts.get(filename)
    if text is None:
        res = importlib.resources.files(__package__).joinpath("cuda").joinpath(filename)
        try:
            text = res.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"CUDA source {filename!r} is missing from nimbus/arrays/kernels/cuda/ "
                "(package data; reinstall cumulonimbus)") from None
        _texts[filename] = text
    return text


_CTYPES = {np.dtype(np.float32): ("float", 4), np.dtype(np.float16): ("u16", 2)}


def source(name, **defs):
    """Full CUDA source of kernel ``name`` for the substitutions ``defs``: a header of
    ``#define`` lines, ``cuda/prelude.cuh``, then the family's files (:data:`_FAMILIES`),
    with ``PRAGMA_UNROLL_C`` replaced by the codebook loop's unroll pragma.

    ``defs`` keys: ``IN`` / ``OUT`` / ``LUT`` (numpy dtypes float32/float16), ``NT``,
    ``MT``, ``RPT``, ``NCB``, ``NSTAGE``, ``GROUPS``, ``USE_CP_ASYNC``, ``UNROLL_C``
    (0 = full), ``TREE_DEPTH`` (default 4), ``NK`` (buckets, default 16), ``LUT_Q``.
    Raises KeyError for an unknown kernel name.
    """
    defs = dict(defs)
    lines = []
    for role in ("IN", "OUT", "LUT"):
        dt = defs.pop(role, np.float32)
        ctype, size = _CTYPES[np.dtype(dt)]
        lines.append(f"#define {role}_T {ctype}")
        lines.append(f"#define {role}_SIZE {size}")
    unroll = defs.pop("UNROLL_C", 0)
    defs.setdefault("NT", NT)
    defs.setdefault("USE_CP_ASYNC", 1)
    for k, v in defs.items():
        lines.append(f"#define {k} {int(v)}")
    body = "".join(load_source(f) for f in _FAMILIES[name])
    body = body.replace(_UNROLL_PLACEHOLDER,
                        "#pragma unroll" if not unroll else f"#pragma unroll {int(unroll)}")
    return "\n".join(lines) + "\n" + load_source(_PRELUDE_FILE) + body


# --------------------------------------------------------------------------- compile cache
_kernel_cache = {}       # (name, device id, substitutions) -> cupy.RawKernel


def _kernel(name, device_id, **defs):
    """The compiled kernel ``name`` for ``defs`` on device ``device_id`` (compiled once)."""
    key = (name, int(device_id), tuple(sorted((k, str(np.dtype(v)) if k in ("IN", "OUT", "LUT")
                                                else int(v)) for k, v in defs.items())))
    k = _kernel_cache.get(key)
    if k is None:
        cp = backend.cupy()
        k = cp.RawKernel(source(name, **defs), name)
        _kernel_cache[key] = k
    return k


_props = {}


def device_info(device_id):
    """Limits of a device that the launchers plan with (cached).

    Returns
    -------
    dict: ``sms`` multiprocessors, ``smem_block`` / ``smem_optin`` / ``smem_sm`` shared
    memory bytes (default per block, opt-in per block, per multiprocessor), ``regs_sm``,
    ``cc`` compute capability as 10*major+minor, ``clock_khz`` SM clock.
    """
    p = _props.get(device_id)
    if p is None:
        rt = backend.cupy().cuda.runtime

        def attr(code, default):
            try:
                return int(rt.deviceGetAttribute(code, device_id))
            except Exception:       # an attribute this runtime does not know
                return default
        # cudaDeviceAttr codes: 16 multiprocessors, 8 shared per block, 97 opt-in shared per
        # block, 81 shared per multiprocessor, 82 registers per multiprocessor, 75/76 compute
        # capability, 13 clock rate (kHz)
        p = dict(sms=attr(16, 1), smem_block=attr(8, 48 * 1024), smem_optin=attr(97, 48 * 1024),
                 smem_sm=attr(81, 64 * 1024), regs_sm=attr(82, 65536),
                 cc=attr(75, 7) * 10 + attr(76, 0), clock_khz=attr(13, 0))
        p["smem_optin"] = max(p["smem_optin"], p["smem_block"])
        _props[device_id] = p
    return p


_smem_raised = {}        # (kernel object id, device) -> dynamic shared-memory limit set


def _launch(kern, grid, block, args, smem, dev):
    """Launch with ``smem`` dynamic shared bytes, raising the kernel's limit when needed."""
    if smem > 48 * 1024:
        if smem > dev["smem_optin"]:
            raise ValueError(f"internal: {smem} bytes of shared memory exceed the device "
                             f"limit {dev['smem_optin']}")
        key = (id(kern), backend.cupy().cuda.Device().id)
        if _smem_raised.get(key, 0) < smem:
            kern.max_dynamic_shared_size_bytes = int(smem)
            _smem_raised[key] = smem
    kern(tuple(int(g) for g in grid), (int(block), 1, 1), args, shared_mem=int(smem))


def _blocks_per_sm(kern, nthreads, smem, dev):
    """Resident blocks per multiprocessor allowed by threads, registers and shared memory."""
    try:
        regs = max(int(kern.num_regs), 1)
    except Exception:
        regs = 64
    by_threads = 2048 // nthreads
    by_regs = dev["regs_sm"] // (((regs + 7) // 8 * 8) * nthreads)
    by_smem = dev["smem_sm"] // (smem + 1024) if smem else by_threads
    return max(1, min(by_threads, by_regs, by_smem))


# --------------------------------------------------------------------------- validation
def _require_cupy(**arrays):
    """All arrays CuPy on one device: that device's id."""
    dev = None
    for name, a in arrays.items():
        if not backend.is_cupy(a):
            raise TypeError(f"{name} must be a CuPy array here (got {type(a).__name__}); "
                            "move every input to one library first")
        if dev is None:
            dev = a.device.id
        elif a.device.id != dev:
            raise ValueError(f"{name} is on device {a.device.id} but the other inputs are on "
                             f"device {dev}")
    return dev


def _rows(A, name="A"):
    """A as a contiguous 2-D float32 or float16 CuPy array."""
    cp = backend.cupy()
    if A.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x columns), got shape {tuple(A.shape)}")
    kind = A.dtype.kind
    if kind == "b" or kind == "c" or kind not in "iuf":
        raise TypeError(f"{name} has dtype {A.dtype}; expected real numbers")
    dt = np.float16 if A.dtype == np.float16 else np.float32
    return cp.ascontiguousarray(A, dtype=dt)


def _c(a, dtype):
    return backend.cupy().ascontiguousarray(a, dtype=dtype)


def _aligned(*arrays):
    return all(a.data.ptr % 16 == 0 for a in arrays)


_dims_ok = {}            # (device, pointer, shape, D) -> the checked dims array itself
_DIMS_CACHE_SIZE = 64      # at most this many checked dims arrays kept alive


def _check_dims(dims, D):
    """Raise ValueError unless every tested column is in [0, D).

    The answer is cached per (device, pointer, shape, D), since learned dims do not
    change. The cache keeps the checked array itself alive: were it to hold only the
    pointer, CuPy's memory pool could hand the same address to a new, unchecked array of
    the same shape (seen on an H200: an out-of-range dims passed as checked). A later
    in-place change of a cached array to out-of-range values is not seen; the byte
    kernels clamp columns, so that gives wrong codes, not reads outside A."""
    key = (dims.device.id, dims.data.ptr, dims.shape, D)
    if key in _dims_ok:
        return
    lo, hi = int(dims.min()), int(dims.max())
    if lo < 0 or hi >= D:
        raise ValueError(f"dims must be column indices in [0, {D}) for A with {D} columns; "
                         f"got values from {lo} to {hi}")
    if len(_dims_ok) >= _DIMS_CACHE_SIZE:
        _dims_ok.clear()
    _dims_ok[key] = dims


def _tree_args(A, dims, thresholds):
    """(device id, A, dims, thresholds, depth) with the arrays contiguous, exact dtypes."""
    dev = _require_cupy(A=A, dims=dims, thresholds=thresholds)
    A = _rows(A)
    depth = validate.check_tree(dims, thresholds, validate.BYTE_DEPTH)   # ValueError
    if dims.dtype.kind not in "iu":
        raise TypeError(f"dims must hold integer column indices, got dtype {dims.dtype}")
    if thresholds.dtype.kind != "f":
        raise TypeError(f"thresholds must be floating point, got dtype {thresholds.dtype}")
    dims = _c(dims, np.int32)
    thresholds = _c(thresholds, np.float32)
    if A.shape[0] > _MAX_INT32 or A.shape[1] > _MAX_INT32 // 2:
        raise ValueError(f"A has shape {tuple(A.shape)}: too large for the GPU kernels")
    if dims.shape[0]:
        _check_dims(dims, A.shape[1])
    return dev, A, dims, thresholds, depth


def _lut_q_args(lut_q, scale, bias, C):
    if lut_q.ndim != 3 or lut_q.shape[0] != C:
        raise ValueError(f"lut_q must have shape (C={C}, K, M), got {tuple(lut_q.shape)}")
    if lut_q.dtype != np.uint8:
        raise TypeError(f"lut_q must have dtype uint8, got {lut_q.dtype}")
    M = lut_q.shape[2]
    for name, v in (("scale", scale), ("bias", bias)):
        if v.shape != (M,):
            raise ValueError(f"{name} must have shape ({M},) to match lut_q {tuple(lut_q.shape)}, "
                             f"got {tuple(v.shape)}")
    return _c(lut_q, np.uint8), _c(scale, np.float32), _c(bias, np.float32)


def _out_dtype(out_dtype):
    dt = np.dtype(out_dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise TypeError(f"out_dtype must be float32 or float16, got {dt}")
    return dt


def _codes(codes, C=None):
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (N, C), got shape {tuple(codes.shape)}")
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must have dtype uint8, got {codes.dtype}")
    if C is not None and codes.shape[1] != C:
        raise ValueError(f"codes have {codes.shape[1]} codebooks (shape {tuple(codes.shape)}) "
                         f"but the LUT has {C}")
    if codes.shape[0] > _MAX_INT32:
        raise ValueError(f"codes have {codes.shape[0]} rows: too many for the GPU kernels")
    return _c(codes, np.uint8)


def _raise_if_flagged(flag, A):
    if int(flag.get()[0]):
        validate.finite_or_raise(A, "A")      # names the first bad entry
        raise ValueError("A contains NaN or Inf")   # (not reached: the check above raises)


# --------------------------------------------------------------------------- configs
def _pow2_at_least(x):
    p = 1
    while p < x:
        p *= 2
    return p


def _q_config(C, M, dev, mt=None, rpt=None, nt=NT, budget=_LUT_TILE_BUDGET, K=16):
    """(MT, RPT, RB, smem) for the 8-bit lookup kernel, or None when it does not fit.

    MT (column tile): the widest power of two from 16 to 512 columns whose LUT (C x K x MT
    bytes) fits ``budget`` bytes and that M needs; RPT rows per thread (1 past 256
    codebooks, where 32-bit totals take the registers); RB rows per batch.
    """
    if rpt is None:      # past 256 codebooks the 32-bit totals take the registers
        rpt = 1 if C > 256 else 4
    if mt is None:
        mt = 16
        top = min(512, max(16, _pow2_at_least(M)), nt * 16)
        while mt * 2 <= top and C * K * mt * 2 <= budget:
            mt *= 2
    if mt % 16 or mt & (mt - 1) or mt // 16 > nt:
        raise ValueError(f"column tile {mt} must be a power of two from 16 to {nt * 16}")
    rb = nt // (mt // 16) * rpt
    smem = C * K * mt + 8 * mt + 2 * ((rb * ((C + 3) // 4 * 4) + 15) // 16 * 16)  # LUT, scale
    # and bias, two code buffers
    if smem > dev["smem_optin"]:
        return None
    return mt, rpt, rb, smem


def _lut_unit(lut_q, M, out_dt):
    """Bytes per asynchronous LUT copy: 8 or 4 when that divides M, the output chunk (4
    columns for float32 output, 8 for float16) and the LUT's address; else 1 (bytes)."""
    ch = 16 // out_dt.itemsize
    for unit in (8, 4):
        if unit <= ch and M % unit == 0 and lut_q.data.ptr % unit == 0:
            return unit
    return 1


def _unroll_c(C):
    return 0 if C <= 64 else 4


# --------------------------------------------------------------------------- encoders
def encode_tree(A, dims, thresholds, *, check_finite=True):
    """Codes of the rows of A under C trees of depth d (see :func:`.reference.encode_tree`).

    The depth is read off ``dims.shape[1] = 2**d - 1`` (1 <= d <= 8); each depth is its
    own compiled kernel (a ``TREE_DEPTH`` substitution), so depth 4 runs the same code as
    before trees of other depths existed.

    Parameters
    ----------
    A : (N, D) float32 or float16 CuPy array (other real dtypes are cast to float32)
    dims : (C, 2**d - 1) int32, columns in [0, D)
    thresholds : (C, 2**d - 1) float32
    check_finite : bool, raise ValueError if A holds NaN/Inf (one flag read: a sync)

    Returns
    -------
    codes : (N, C) uint8, leaves 0 .. 2**d - 1
    """
    cp = backend.cupy()
    dev_id, A, dims, thresholds, depth = _tree_args(A, dims, thresholds)
    N, D = A.shape
    C = dims.shape[0]
    codes = cp.empty((N, C), dtype=np.uint8)
    if N == 0 or C == 0:
        if check_finite and A.size:
            validate.finite_or_raise(A, "A")
        return codes
    with cp.cuda.Device(dev_id):
        dev = device_info(dev_id)
        flag = cp.zeros(1, dtype=np.int32)
        isz = A.itemsize
        head = (C * (2 ** depth - 1) * 8 + 15) // 16 * 16        # the trees' dims, thresholds
        rows = max(1, min(64, _ENCODE_TILE_BUDGET // (D * isz)))
        smem = head + (rows * D * isz + 15) // 16 * 16
        if smem <= dev["smem_optin"]:
            a_vec = int(_aligned(A) and (D * isz) % 16 == 0)
            kern = _kernel("encode_tree_tile", dev_id, IN=A.dtype, USE_CP_ASYNC=dev["cc"] >= 80,
                           TREE_DEPTH=depth)
            ntiles = (N + rows - 1) // rows
            grid = min(ntiles, dev["sms"] * _blocks_per_sm(kern, NT, smem, dev) * 4)
            _launch(kern, (grid,), NT, (A, dims, thresholds, codes, flag, np.int32(N),
                                        np.int32(D), np.int32(C), np.int32(rows),
                                        np.int32(a_vec)), smem, dev)
        else:
            kern = _kernel("encode_tree_direct", dev_id, IN=A.dtype, USE_CP_ASYNC=0,
                           TREE_DEPTH=depth)
            grid = min((N * C + NT - 1) // NT, dev["sms"] * 32)
            _launch(kern, (grid,), NT, (A, dims, thresholds, codes, flag, np.int32(N),
                                        np.int32(D), np.int32(C)), 0, dev)
        if check_finite:
            _raise_if_flagged(flag, A)
    return codes


def encode_pq(A, centroids, starts, *, check_finite=True):
    """Nearest-centroid codes per subspace (see :func:`.reference.encode_pq`).

    Parameters
    ----------
    A : (N, D) float32 or float16 CuPy array
    centroids : (C, 16, W) float32, zero padded past each subspace's width
    starts : (C + 1,) int (NumPy or CuPy), subspace c is columns starts[c]:starts[c+1]
    check_finite : bool, raise ValueError if A holds NaN/Inf

    Returns
    -------
    codes : (N, C) uint8
    """
    cp = backend.cupy()
    dev_id = _require_cupy(A=A, centroids=centroids)
    A = _rows(A)
    if centroids.ndim != 3:
        raise ValueError(f"centroids must have shape (C, K, W), got {tuple(centroids.shape)}")
    C, K, W = centroids.shape
    st = np.asarray(backend.to_host(starts)).astype(np.int64).ravel()
    N, D = A.shape
    if st.shape != (C + 1,):
        raise ValueError(f"starts must have C + 1 = {C + 1} entries, got {st.shape[0]}")
    widths = np.diff(st)
    if st[0] < 0 or st[-1] > D or (widths < 0).any() or (widths > W).any():
        raise ValueError(f"starts must rise from >= 0 to <= D={D} in steps of at most W={W}; "
                         f"got {st.tolist()}")
    if K != 16 or C > 65535 or N > _MAX_INT32 or N == 0 or C == 0:
        if check_finite and A.size:
            validate.finite_or_raise(A, "A")
        return reference.encode_pq(A, centroids, starts)
    codes = cp.empty((N, C), dtype=np.uint8)
    with cp.cuda.Device(dev_id):
        dev = device_info(dev_id)
        flag = cp.zeros(1, dtype=np.int32)
        cent = _c(centroids, np.float32)
        st_d = cp.asarray(st.astype(np.int32))
        kern = _kernel("encode_pq_kernel", dev_id, IN=A.dtype, USE_CP_ASYNC=0)
        gx = min((N + NT - 1) // NT, max(1, dev["sms"] * 8 // C + 1))
        _launch(kern, (gx, C), NT, (A, cent, st_d, codes, flag, np.int32(N), np.int32(D),
                                    np.int32(C), np.int32(W)), 0, dev)
        if check_finite:
            # columns outside every subspace are not read by this kernel: check them too
            if st[0] > 0 or st[-1] < D or (widths == 0).any():
                validate.finite_or_raise(A, "A")
            _raise_if_flagged(flag, A)
    return codes


# --------------------------------------------------------------------------- lookups
def _lookup_global(codes, lut, scale, bias, Y, dev_id, dev, K):
    """Launch the L1/L2 fallback ``lookup_global_kernel`` into Y (the LUT tile did not fit
    in shared memory): the 8-bit LUT with ``scale``/``bias`` when lut is uint8, else the
    float LUT (scale and bias None)."""
    N, C = codes.shape
    M = Y.shape[1]
    vec = int(M % 4 == 0 and lut.data.ptr % (4 * lut.itemsize) == 0)
    quant = lut.dtype == np.uint8
    defs = dict(LUT_Q=1) if quant else dict(LUT_Q=0, LUT=lut.dtype)
    kern = _kernel("lookup_global_kernel", dev_id, OUT=Y.dtype, NK=K, **defs)
    if not quant:
        scale = bias = lut           # not read
    total = N * ((M + 3) // 4)
    grid = max(1, min((total + NT - 1) // NT, dev["sms"] * 16))
    _launch(kern, (grid,), NT, (codes, lut, scale, bias, Y, np.int32(N), np.int32(M),
                                np.int32(C), np.int32(vec)), 0, dev)
    return Y


def lookup_q(codes, lut_q, scale, bias, out_dtype=np.float32, *, mt=None, rpt=None):
    """8-bit LUT sums, exact in integers, then ``isum * scale + bias``.

    The LUT's column tile (C x K x MT bytes) is kept in shared memory; when even the
    narrowest tile (MT = 16) does not fit (C * K above about 14000 on an H100, e.g. K = 256
    with C >= 57), a kernel that reads the LUT through L1/L2 runs instead (slower).

    Parameters
    ----------
    codes : (N, C) uint8 CuPy array (values are taken mod K, as CuPy's reference indexes,
        when K is a power of two; mod K in general)
    lut_q : (C, K, M) uint8, any K in 1..256
    scale, bias : (M,) float32
    out_dtype : float32 or float16
    mt, rpt : kernel variant (column tile, rows per thread); defaults are the measured
        best

    Returns
    -------
    Y : (N, M) out_dtype
    """
    cp = backend.cupy()
    dev_id = _require_cupy(codes=codes, lut_q=lut_q, scale=scale, bias=bias)
    out_dt = _out_dtype(out_dtype)
    if lut_q.ndim != 3:
        raise ValueError(f"lut_q must have shape (C, K, M), got {tuple(lut_q.shape)}")
    C, K = lut_q.shape[0], validate.lut_buckets(lut_q, validate.BYTE_DEPTH)
    codes = _codes(codes, C)
    lut_q, scale, bias = _lut_q_args(lut_q, scale, bias, C)
    N, M = codes.shape[0], lut_q.shape[2]
    Y = cp.empty((N, M), dtype=out_dt)
    if N == 0 or M == 0:
        return Y
    if C == 0:
        Y[...] = bias[None, :].astype(out_dt)
        return Y
    with cp.cuda.Device(dev_id):
        dev = device_info(dev_id)
        cfg = None
        for r in ([rpt] if rpt else [None, 2, 1]):      # fewer rows: smaller code buffers
            cfg = cfg or _q_config(C, M, dev, mt, r, K=K)
        if cfg is None or (M + cfg[0] - 1) // cfg[0] > 65535:
            return _lookup_global(codes, lut_q, scale, bias, Y, dev_id, dev, K)
        MT, RPT, RB, smem = cfg
        codes_vec = int(C % 4 == 0 and _aligned(codes))
        kern = _kernel("lookup_q_kernel", dev_id, OUT=out_dt, NCB=C, MT=MT, RPT=RPT, NK=K,
                       USE_CP_ASYNC=dev["cc"] >= 80, UNROLL_C=_unroll_c(C))
        gy = (M + MT - 1) // MT
        nbatch = (N + RB - 1) // RB
        per_sm = _blocks_per_sm(kern, NT, smem, dev)
        gx = max(1, min(nbatch, -(-dev["sms"] * per_sm // gy)))
        _launch(kern, (gx, gy), NT, (codes, lut_q, scale, bias, Y, np.int32(N), np.int32(M),
                                     np.uint32(1), np.int32(_lut_unit(lut_q, M, out_dt)),
                                     np.int32(codes_vec)), smem, dev)
    return Y


def lookup(codes, lut, out_dtype=np.float32, *, mt=None, rpt=4):
    """Float LUT sums ``Y[n] = sum_c lut[c, codes[n, c]]`` in float32, codebooks in order.

    As :func:`lookup_q`: the LUT's column tile in shared memory, or, when even the narrowest
    tile does not fit, a kernel reading the LUT through L1/L2 (same sums, same order).

    Parameters
    ----------
    codes : (N, C) uint8 CuPy array (values taken mod K)
    lut : (C, K, M) float32 or float16 (accumulated in float32), any K in 1..256
    out_dtype : float32 or float16

    Returns
    -------
    Y : (N, M) out_dtype
    """
    cp = backend.cupy()
    dev_id = _require_cupy(codes=codes, lut=lut)
    out_dt = _out_dtype(out_dtype)
    if lut.ndim != 3:
        raise ValueError(f"lut must have shape (C, K, M), got {tuple(lut.shape)}")
    if lut.dtype.kind != "f":
        raise TypeError(f"lut must be floating point, got dtype {lut.dtype}")
    C, K, M = lut.shape
    K = validate.lut_buckets(lut, validate.BYTE_DEPTH)
    codes = _codes(codes, C)
    N = codes.shape[0]
    lut_dt = np.dtype(np.float16) if lut.dtype == np.float16 else np.dtype(np.float32)
    lut = _c(lut, lut_dt)
    Y = cp.empty((N, M), dtype=out_dt)
    if N == 0 or M == 0:
        return Y
    if C == 0:
        Y[...] = 0
        return Y
    with cp.cuda.Device(dev_id):
        dev = device_info(dev_id)
        vl = 16 // lut_dt.itemsize
        if mt is None:
            mt = vl
            top = min(max(vl, _pow2_at_least(M)), NT * vl)
            while mt * 2 <= top and C * K * mt * 2 * lut_dt.itemsize <= _LUT_TILE_BUDGET:
                mt *= 2
        tpr = mt // vl
        rb = NT // tpr * rpt
        smem = C * K * mt * lut_dt.itemsize + (rb * ((C + 3) // 4 * 4) + 15) // 16 * 16
        if smem > dev["smem_optin"] or (M + mt - 1) // mt > 65535:
            return _lookup_global(codes, lut, None, None, Y, dev_id, dev, K)
        lut_vec = int(_aligned(lut) and M % vl == 0)
        y_vec = int(_aligned(Y) and (M * out_dt.itemsize) % 16 == 0)
        kern = _kernel("lookup_kernel", dev_id, OUT=out_dt, LUT=lut_dt, NCB=C, MT=mt, RPT=rpt,
                       NK=K, UNROLL_C=_unroll_c(C))
        gy = (M + mt - 1) // mt
        nbatch = (N + rb - 1) // rb
        gx = max(1, min(nbatch, -(-dev["sms"] * _blocks_per_sm(kern, NT, smem, dev) // gy)))
        _launch(kern, (gx, gy), NT, (codes, lut, Y, np.int32(N), np.int32(M), np.int32(lut_vec),
                                     np.int32(y_vec)), smem, dev)
    return Y


def lookup_backward(codes, grad_Y, nbuckets=16):
    """Scatter-add of gradient rows into LUT buckets (see :func:`.reference.lookup_backward`).

    Per block, a (codebooks x K x 32 columns) float accumulator in shared memory; the
    group of codebooks shrinks as K grows (16 at K <= 16, 1 at K = 256, where 7 of a
    block's 8 warps idle: correct, not fast).

    Parameters
    ----------
    codes : (N, C) uint8 CuPy array (codes >= K add nothing, as in the reference)
    grad_Y : (N, M) float32
    nbuckets : int, K in 1..256

    Returns
    -------
    grad_lut : (C, K, M) float32
    """
    cp = backend.cupy()
    dev_id = _require_cupy(codes=codes, grad_Y=grad_Y)
    codes = _codes(codes)
    if grad_Y.ndim != 2 or grad_Y.shape[0] != codes.shape[0]:
        raise ValueError(f"grad_Y must have shape (N={codes.shape[0]}, M), got "
                         f"{tuple(grad_Y.shape)}")
    K = validate.check_nbuckets(nbuckets, validate.BYTE_DEPTH)
    g = _c(grad_Y, np.float32)
    N, C = codes.shape
    M = g.shape[1]
    out = cp.zeros((C, K, M), dtype=np.float32)
    if N == 0 or C == 0 or M == 0:
        return out
    with cp.cuda.Device(dev_id):
        dev = device_info(dev_id)
        # 16 codebooks of 16 buckets: 32 KB of accumulators; more buckets, fewer codebooks
        CB = max(1, min(C, 16, 16 * 16 // K))
        gx, gz = (M + 31) // 32, (C + CB - 1) // CB
        if gx > 65535 * 1024 or gz > 65535:
            return reference.lookup_backward(codes, g, K)
        want = dev["sms"] * 8
        gy = max(1, min(65535, (N + 15) // 16, -(-want // (gx * gz))))
        rows = (N + gy - 1) // gy
        gy = (N + rows - 1) // rows
        kern = _kernel("lookup_backward_kernel", dev_id, NK=K)
        _launch(kern, (gx, gy, gz), NT, (codes, g, out, np.int32(N), np.int32(C), np.int32(M),
                                         np.int32(rows), np.int32(CB)), CB * K * 32 * 4, dev)
    return out


# --------------------------------------------------------------------------- fused apply
def _fused_config(C, M, D, in_size, dev, mt=None, rpt=None, nstage=None, groups=1):
    """(NT, MT, RPT, RB, NSTAGE, smem) of the fused simt kernel, or None when it would not fit.

    Float32 input first tries 1 row per thread and 4 stages of A tiles at the widest
    column tile that allows them: at 65536 x 512 x 512, C = 16 on an H100 this was
    0.106 ms with 256-column tiles against 0.117 ms with one 512-column tile and 2
    stages; float16 input lost with 256-column tiles (0.082 against 0.0625 ms).
    Otherwise: the fewest column tiles (each tile re-encodes its rows), then 2 stages,
    then 2 rows per thread; the budget is the device's opt-in shared memory per block.
    ``groups``: warp groups per block (each with its own codes and A buffers; RB is then
    a group's batch)."""
    tops = [mt] if mt else [t for t in (512, 256, 128, 64, 32, 16)
                            if t <= max(16, _pow2_at_least(M))]
    cp_ = (C + 3) // 4 * 4
    cands = []
    if in_size == 4 and mt is None and rpt is None and nstage is None:
        cands += [(t, 4, 1) for t in tops]
    for t in tops:
        for ns in ([nstage] if nstage else [2, 3]):
            for r in ([rpt] if rpt else ([1] if C > 256 else [2, 1])):
                cands.append((t, ns, r))
    for t, ns, r in cands:
        nt = 512 if t // 16 >= 32 else NT
        if t // 16 > nt // groups or ns < 2:
            continue
        rb = nt // groups // (t // 16) * r
        head = (C * 16 * t + C * 120 + 15) // 16 * 16
        smem = head + groups * ((rb * cp_ + 15) // 16 * 16
                                + ns * ((rb * D * in_size + 15) // 16 * 16))
        if smem <= dev["smem_optin"]:
            return nt, t, r, rb, ns, smem
    return None


def encode_lookup_q(A, dims, thresholds, lut_q, scale, bias, out_dtype=np.float32, *,
                    mode="auto", mt=None, rpt=None, nstage=None, groups=None,
                    check_finite=True):
    """MADDNESS apply: ``lookup_q(encode_tree(A, dims, thresholds), lut_q, scale, bias)``.

    Parameters
    ----------
    A : (N, D) float32 or float16 CuPy array
    dims : (C, K - 1) int32; thresholds : (C, K - 1) float32: trees of depth d, K = 2**d
        leaves, 1 <= d <= 8 (read off the shape)
    lut_q : (C, K, M) uint8; scale, bias : (M,) float32
    out_dtype : float32 or float16
    mode : "auto" (the fused kernel when its tiles fit in shared memory and either M
        fits one column tile or C <= 16; else the encode and lookup kernels), "fused" or
        "split". The fused kernels exist for depth 4 (K = 16) only: for other depths
        every mode, "fused" included, runs the encode and lookup kernels (as "fused" also
        does at K = 16 when the fused tiles do not fit)
    mt, rpt : kernel variant (see :func:`lookup_q`); nstage: A tile buffers; groups:
        the fused kernel with this many independent warp groups per block sharing the
        LUT tile (1, 2 or 4). None: 4 for float16 input,
        2 for float32 (H100, 65536 x 512 x 512, C = 16: fp16 0.0583 ms with 4 groups,
        0.0593 with 2, 0.0625 with 1; fp32 0.1048 ms with 2, 0.1061 with 1), 1 where a
        grouped plan does not fit
    check_finite : bool, raise ValueError if A holds NaN/Inf

    Returns
    -------
    Y : (N, M) out_dtype
    """
    cp = backend.cupy()
    dev_id = _require_cupy(A=A, dims=dims, thresholds=thresholds, lut_q=lut_q, scale=scale,
                           bias=bias)
    validate.check_choice(mode, "mode", ("auto", "fused", "split"))
    validate.check_choice(groups, "groups", (None, 1, 2, 4))
    out_dt = _out_dtype(out_dtype)
    dev_id, A, dims, thresholds, depth = _tree_args(A, dims, thresholds)
    C = dims.shape[0]
    lut_q, scale, bias = _lut_q_args(lut_q, scale, bias, C)
    if lut_q.shape[1] != 2 ** depth:
        raise ValueError(f"lut_q {tuple(lut_q.shape)} must have K = {2 ** depth} buckets, one per "
                         f"leaf of the depth-{depth} trees (dims {tuple(dims.shape)})")
    N, D = A.shape
    M = lut_q.shape[2]
    cfg = None
    with cp.cuda.Device(dev_id):
        dev = device_info(dev_id)
        if mode != "split" and depth == 4 and C > 0 and N > 0 and M > 0:
            if groups is None:      # one group waits on its loads while another sums
                groups = 4 if A.itemsize == 2 else 2
                cfg = _fused_config(C, M, D, A.itemsize, dev, mt, rpt, nstage, groups)
                if cfg is None:
                    groups = 1
            if cfg is None:
                cfg = _fused_config(C, M, D, A.itemsize, dev, mt, rpt, nstage, groups)
            # measured (H100, bench_gpu, 16 shapes): fused wins when M fits one column tile
            # or C <= 16; with more codebooks the LUT tile narrows, every tile re-encodes
            # its rows, and the encode + lookup kernels win
            if cfg is not None and mode == "auto":
                if (M + cfg[1] - 1) // cfg[1] > 1 and C > 16:
                    cfg = None
            if cfg is not None and (M + cfg[1] - 1) // cfg[1] > 65535:
                cfg = None
        if cfg is None:
            codes = encode_tree(A, dims, thresholds, check_finite=check_finite)
            return lookup_q(codes, lut_q, scale, bias, out_dt, mt=mt, rpt=rpt)
        nt, MT, RPT, RB, NS, smem = cfg
        Y = cp.empty((N, M), dtype=out_dt)
        flag = cp.zeros(1, dtype=np.int32)
        a_vec = int(_aligned(A) and (D * A.itemsize) % 16 == 0)
        kern = _kernel("encode_lookup_q_kernel", dev_id, IN=A.dtype, OUT=out_dt, NT=nt, NCB=C,
                       MT=MT, RPT=RPT, NSTAGE=NS,
                       USE_CP_ASYNC=dev["cc"] >= 80, UNROLL_C=_unroll_c(C),
                       **({"GROUPS": groups} if groups > 1 else {}))
        gy = (M + MT - 1) // MT
        nbatch = (N + RB - 1) // RB
        gx = max(1, min(-(-nbatch // groups),
                        -(-dev["sms"] * _blocks_per_sm(kern, nt, smem, dev) // gy)))
        _launch(kern, (gx, gy), nt, (A, dims, thresholds, lut_q, scale, bias, Y, flag,
                                     np.int32(N), np.int32(D), np.int32(M), np.uint32(1),
                                     np.int32(a_vec), np.int32(_lut_unit(lut_q, M, out_dt))),
                smem, dev)
        if check_finite:
            _raise_if_flagged(flag, A)
    return Y


def spin(cycles, device_id=None):
    """Keep the current device busy for ``cycles`` clock ticks (benchmark helper)."""
    cp = backend.cupy()
    dev_id = cp.cuda.Device().id if device_id is None else device_id
    kern = _kernel("spin_kernel", dev_id)
    kern((1,), (1,), (np.int64(cycles),))
