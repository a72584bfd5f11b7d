"""The kernel op table: one entry per hot loop, dispatched by array type.

This module is the only place that picks an implementation by array library:

* NumPy arrays go to :mod:`.cpu` (Numba; the DM backward's node pass in :mod:`.dm_cpu`);
* CuPy arrays go to :mod:`.cuda` (RawKernels, CUDA C in the ``cuda/`` folder), or to
  :mod:`.dm_cuda` for codes wider than a byte and the DM ops, falling back to the
  plain-array :mod:`.reference` for any op those modules do not provide;
* :mod:`.reference` and :mod:`.dm_reference` are the test oracles. Only this package
  imports them (the fallback); production checks and shape rules live in
  :mod:`nimbus.arrays.validate`.

The op table
------------
:data:`OP_TABLE` names, for every op, its four implementations and the tests that hold
them to the oracle::

    OP_TABLE[op] = KernelOp(reference="reference.encode_tree",   # the oracle (plain xp)
                            cpu="cpu.encode_tree",               # Numba
                            cuda="cuda.encode_tree",             # CuPy RawKernels, byte codes
                            cuda_wide="dm_cuda.encode",          # CuPy, codes beyond a byte
                            tests=("tests/arrays/test_kernels.py::test_...", ...))

Each implementation is ``"module.function"`` relative to this package (None: there is
none, and the dispatch composes the op from others or runs the reference); each test is
``file::function`` relative to the repository root. tests/arrays/test_op_table.py checks
that every name resolves and every test exists, so an op added here without its
kernels and tests fails the suite. To add a kernel: the oracle in :mod:`.reference`, the
Numba version in :mod:`.cpu`, the CUDA version in :mod:`.cuda` (its C in ``cuda/*.cu``),
a test comparing them, then its entry here (and in :data:`OPS` if it dispatches by array
library through :func:`implementation`).

Ops (shapes and semantics in :mod:`.reference` and :mod:`.dm_reference`):
``encode_tree``, ``encode_pq``, ``lookup``, ``lookup_q``, ``lookup_backward``,
``encode_lookup_q``, ``dm_forward``, ``dm_backward``.

Trees have any depth d in 1..10, read from the width of ``dims``: (C, K-1) with
K = 2**d leaves (:func:`nimbus.arrays.validate.tree_depth`; another width raises
ValueError); LUTs are (C, K, M) with K read from ``lut.shape[1]``. Codes are uint8 up to
depth 8 (K <= 256) and uint16 beyond (:func:`nimbus.arrays.validate.code_dtype`). The
Numba kernels take both. On CuPy, ops on wider codes (trees of depth 9-10, LUTs of K >
256; see :func:`_wide`) go to the depth-templated kernels of :mod:`.dm_cuda` (the
``cuda_wide`` column: encode, float and 8-bit lookups, LUT scatter-add, for K a power of
two; the reference otherwise): the byte-tuned kernels of :mod:`.cuda` take byte codes
only.
"""
from __future__ import annotations

import importlib
import threading
from typing import NamedTuple, Optional, Tuple

import numpy as np

from .. import backend, validate
from . import reference


class KernelOp(NamedTuple):
    """One row of :data:`OP_TABLE`: ``"module.function"`` names relative to this package
    (None where there is no such implementation) and ``file::test`` names."""
    reference: str
    cpu: Optional[str]
    cuda: Optional[str]
    cuda_wide: Optional[str]
    tests: Tuple[str, ...]


_TK = "tests/arrays/test_kernels.py::"
_TC = "tests/arrays/test_cuda.py::"
_TW = "tests/arrays/test_wide_codes.py::"
OP_TABLE = {
    "encode_tree": KernelOp(
        "reference.encode_tree", "cpu.encode_tree", "cuda.encode_tree", "dm_cuda.encode",
        (_TK + "test_encode_tree_matches_reference",
         _TK + "test_encode_tree_any_depth_matches_reference",
         _TW + "test_op_table_sends_wide_gpu_ops_to_dm_cuda")),
    "encode_pq": KernelOp(
        "reference.encode_pq", "cpu.encode_pq", "cuda.encode_pq", None,
        (_TK + "test_encode_pq_matches_reference",)),
    "lookup": KernelOp(
        "reference.lookup", "cpu.lookup", "cuda.lookup", "dm_cuda.lookup",
        (_TK + "test_lookup_matches_reference", _TK + "test_lookups_with_any_K_match_reference",
         _TW + "test_lookups_with_wide_codes_match_row_sums")),
    "lookup_q": KernelOp(
        "reference.lookup_q", "cpu.lookup_q", "cuda.lookup_q", "dm_cuda.lookup_q",
        (_TK + "test_lookup_q_exact_integer_sums", _TK + "test_lookups_with_any_K_match_reference",
         _TW + "test_op_table_sends_wide_gpu_ops_to_dm_cuda")),
    "lookup_backward": KernelOp(
        "reference.lookup_backward", "cpu.lookup_backward", "cuda.lookup_backward",
        "dm_cuda.lut_grad",
        (_TK + "test_lookup_backward_is_scatter_add", _TC + "test_lookup_backward_drops_codes_past_k",
         _TW + "test_op_table_sends_wide_gpu_ops_to_dm_cuda")),
    "encode_lookup_q": KernelOp(
        "reference.encode_lookup_q", "cpu.encode_lookup_q", "cuda.encode_lookup_q", None,
        (_TC + "test_encode_lookup_q_matches_reference", _TC + "test_fused_and_split_dtypes",
         _TK + "test_encode_lookup_q_any_depth_matches_reference")),
    # the DM ops: on NumPy the forward is cpu.encode_tree + cpu.lookup (composed below),
    # the backward's node pass is dm_cpu's; on CuPy dm_cuda runs both at every depth
    "dm_forward": KernelOp(
        "dm_reference.dm_forward", None, "dm_cuda.dm_forward", "dm_cuda.dm_forward",
        (_TC + "test_dm_kernels_any_depth",
         "tests/nn/test_dm.py::test_forward_equals_hard_maddness_exactly")),
    "dm_backward": KernelOp(
        "dm_reference.dm_backward", "dm_cpu.node_backward", "dm_cuda.dm_backward",
        "dm_cuda.dm_backward",
        (_TC + "test_dm_kernels_any_depth",
         "tests/nn/test_dm.py::test_backward_matches_slow_reference",
         "tests/nn/test_dm.py::test_any_depth_backward_matches_slow_reference")),
    # a converted network's chain of 8-bit LUT layers in one call (the compiled runtime's
    # kernel): built once by :func:`chain`, called per batch
    "chain": KernelOp(
        "reference.chain", "runtime_cpu.ChainCPU", "runtime_cuda.ChainCUDA",
        "runtime_cuda.ChainCUDA",
        ("tests/arrays/test_runtime_cpu.py::test_chain_matches_reference",
         "tests/arrays/test_runtime_cuda.py::test_chain_matches_reference",
         "tests/nn/test_runtime.py::test_compiled_equals_model")),
}

# ops that :func:`implementation` dispatches by array library (cpu / cuda / reference)
OPS = ("encode_tree", "encode_pq", "lookup", "lookup_q", "lookup_backward", "encode_lookup_q")


def resolve(name):
    """The function named ``"module.function"`` (relative to this package) in
    :data:`OP_TABLE`; imports the module (ImportError if it cannot be, e.g. no Numba)."""
    module, _, func = name.rpartition(".")
    return getattr(importlib.import_module(f"{__name__}.{module}"), func)


_modules = {}


def _module(lib):
    if lib not in _modules:
        name = "cpu" if lib == "numpy" else "cuda"
        try:
            _modules[lib] = importlib.import_module(f"{__name__}.{name}")
        except ImportError:
            if lib == "numpy":
                raise
            _modules[lib] = None          # no RawKernels: the reference runs on CuPy
    return _modules[lib]


def _wide(dims=None, codes=None, nbuckets=None):
    """True for trees, codes or LUTs beyond a byte (depth > 8, uint16 codes, K > 256): the
    kernels of :mod:`.cuda` write and read uint8 codes, so on CuPy these go elsewhere
    (:func:`_wide_gpu`)."""
    if dims is not None and int(dims.shape[1]) > (1 << validate.BYTE_DEPTH) - 1:
        return True
    if codes is not None and codes.dtype == np.uint16:
        return True
    return nbuckets is not None and int(nbuckets) > 1 << validate.BYTE_DEPTH


# ops on wide codes that dm_cuda serves on CuPy (its kernels are templated on the depth):
# the cuda_wide column of the table for the ops dispatched by array library
_WIDE_GPU = {op: OP_TABLE[op].cuda_wide.partition(".")[2] for op in OPS
             if OP_TABLE[op].cuda_wide}


def _wide_gpu(op, K):
    """For CuPy arrays beyond a byte: the dm_cuda function serving ``op`` with K leaves (a
    power of two), else the reference."""
    mod = _dm_gpu() if op in _WIDE_GPU and int(K) & (int(K) - 1) == 0 else None
    return getattr(mod, _WIDE_GPU[op]) if mod is not None else getattr(reference, op)


def implementation(op, *arrays):
    """The function that runs ``op`` for arrays of this library."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {', '.join(OPS)}")
    lib = backend.library_name(arrays[0]) if arrays else "numpy"
    mod = _module(lib)
    fn = getattr(mod, op, None) if mod is not None else None
    return fn if fn is not None else getattr(reference, op)


_state = threading.local()


def finite_checks_enabled():
    """Whether the encode ops check A for NaN/Inf in this thread (default True)."""
    return getattr(_state, "check", True)


class finite_checks:
    """Context manager: ``with finite_checks(False):`` the encode ops of this thread skip
    their NaN/Inf check of A where skipping saves time.

    On the GPU the check is fused into the encode kernel but raising needs one
    device-to-host read of a flag, which synchronises the host with the device (0.2-0.3
    ms a call on an H100); without it a call only queues its kernels. Non-finite rows
    then get meaningless codes: the caller promises finite input. On the CPU the Numba
    encoders check in the pass that reads A anyway, so they still raise; a separate
    check pass (reference fallbacks) is skipped.
    """

    def __init__(self, enabled):
        if not isinstance(enabled, (bool, np.bool_)):
            raise TypeError(f"check_finite must be True or False, got {enabled!r}")
        self.enabled = bool(enabled)

    def __enter__(self):
        self._prev = finite_checks_enabled()
        _state.check = self.enabled
        return self

    def __exit__(self, *exc):
        _state.check = self._prev
        return False


def _checked(op, A, fn=None):
    """The implementation of an encode op (or ``fn``), preceded by a NaN/Inf check of A
    unless the implementation does that check itself in its own pass over A (or checks
    are off, see :class:`finite_checks`)."""
    fn = fn or implementation(op, A)
    mod = _module(backend.library_name(A))
    if mod is not None and fn is getattr(mod, op, None) and \
            op in getattr(mod, "FUSED_FINITE_CHECK", ()):
        if not finite_checks_enabled() and backend.is_cupy(A):
            return lambda *args: fn(*args, check_finite=False)     # no flag read, no sync
        return fn
    if not finite_checks_enabled():
        return fn
    return lambda *args: (validate.finite_or_raise(A, "A"), fn(*args))[1]


def encode_tree(A, dims, thresholds):
    """(N, D) float32, (C, K-1) int32, (C, K-1) float32 -> (N, C) codes (0..K-1): uint8,
    or uint16 for trees deeper than 8.

    K = 2**d with the depth d in 1..10 read from dims' width. Raises ValueError if A
    holds NaN or Inf, or if dims' width is not 2**d - 1."""
    if _wide(dims=dims) and backend.is_cupy(A):
        fn = _wide_gpu("encode_tree", int(dims.shape[1]) + 1)
        if fn is reference.encode_tree:    # the reference checks A for NaN/Inf itself
            return fn(A, dims, thresholds)
        return _checked("encode_tree", A, fn)(A, dims, thresholds)
    return _checked("encode_tree", A)(A, dims, thresholds)


def encode_pq(A, centroids, starts):
    """(N, D) float32, (C, K, W) float32, (C+1,) int -> (N, C) uint8 codes.

    Raises ValueError if A holds NaN or Inf."""
    return _checked("encode_pq", A)(A, centroids, starts)


def encode_lookup_q(A, dims, thresholds, lut_q, scale, bias, out_dtype=np.float32):
    """MADDNESS apply in one op: ``lookup_q(encode_tree(A, dims, thresholds), ...)``.

    (N, D) float32 (float16 on the GPU), (C, K-1) int32, (C, K-1) float32, (C, K, M) uint8,
    (M,), (M,) -> (N, M) ``out_dtype`` (float32 or float16), K = 2**d. On CuPy one fused kernel
    (codes stay in shared memory). Raises ValueError if A holds NaN or Inf."""
    if _wide(dims=dims) and backend.is_cupy(A):
        Y = lookup_q(encode_tree(A, dims, thresholds), lut_q, scale, bias)
        return Y.astype(out_dtype, copy=False)
    if not backend.is_cupy(A):
        fast = _cpu_chain(A, dims, thresholds, lut_q, scale, bias)
        if fast is not None:        # the byte-permute kernel (K = 16/32/64 on AVX-512 VBMI)
            try:
                return fast(A, out=np.empty((A.shape[0], lut_q.shape[2]), dtype=np.float32),
                            check_finite=True)
            except ValueError:      # NaN/Inf in A: the checked kernel below says where
                pass
    return _checked("encode_lookup_q", A)(A, dims, thresholds, lut_q, scale, bias, out_dtype)


_CHAINS = {}            # one-layer CPU chains of fitted ops, keyed on their arrays' identity
_CHAINS_MAX = 64


def _cpu_chain(A, dims, thresholds, lut_q, scale, bias):
    """A cached one-layer :class:`.runtime_cpu.ChainCPU` for these arrays when its SIMD
    path applies (faster than cpu.encode_lookup_q at every size measured), else None."""
    K = int(lut_q.shape[1])
    if K not in (16, 32, 64) or A.dtype != np.float32 or not A.flags.c_contiguous:
        return None
    arrays = (dims, thresholds, lut_q, scale, bias)
    key = tuple(id(a) for a in arrays) + (int(A.shape[1]),)
    hit = _CHAINS.get(key)
    if hit is not None and hit[0][0] is dims and hit[0][1] is thresholds and \
            hit[0][2] is lut_q and hit[0][3] is scale and hit[0][4] is bias:
        return hit[1]
    runtime_cpu = importlib.import_module(f"{__name__}.runtime_cpu")
    if not runtime_cpu.simd_supported():
        return None
    layer = dict(zip(("dims", "thresholds", "lut", "scale", "bias"), arrays))
    chain = runtime_cpu.ChainCPU([layer], d_in=int(A.shape[1]), simd=True)
    if len(_CHAINS) >= _CHAINS_MAX:
        _CHAINS.pop(next(iter(_CHAINS)))        # the oldest: the arrays it holds may go
    _CHAINS[key] = (arrays, chain)              # the arrays stay alive: their ids stay theirs
    return chain


def lookup(codes, lut):
    """(N, C) uint8 or uint16, (C, K, M) float32 (K in 1..1024) -> (N, M) float32 sums of
    LUT rows."""
    if _wide(codes=codes, nbuckets=lut.shape[1]) and backend.is_cupy(codes):
        return _wide_gpu("lookup", lut.shape[1])(codes, lut)
    return implementation("lookup", codes)(codes, lut)


def lookup_q(codes, lut_q, scale, bias):
    """(N, C) uint8 or uint16, (C, K, M) uint8 (K in 1..1024), (M,), (M,) -> (N, M) float32, exact
    integer sums."""
    if _wide(codes=codes, nbuckets=lut_q.shape[1]) and backend.is_cupy(codes):
        return _wide_gpu("lookup_q", lut_q.shape[1])(codes, lut_q, scale, bias)
    return implementation("lookup_q", codes)(codes, lut_q, scale, bias)


def lookup_backward(codes, grad_Y, nbuckets=16):
    """(N, C) uint8 or uint16, (N, M) float32 -> (C, K, M) float32 scatter-add of grad
    rows, K = ``nbuckets`` in 1..1024 (codes >= K add nothing)."""
    if _wide(codes=codes, nbuckets=nbuckets) and backend.is_cupy(codes):
        validate.check_nbuckets(nbuckets)
        return _wide_gpu("lookup_backward", nbuckets)(codes, grad_Y, nbuckets)
    return implementation("lookup_backward", codes)(codes, grad_Y, nbuckets)


# ---------------------------------------------------------------- differentiable MADDNESS
# Appended ops (the ops above are unchanged). NumPy: the Numba encode/lookup/
# lookup_backward kernels above plus the fused Numba node backward of dm_cpu; CuPy: the
# RawKernels of dm_cuda, or the plain-xp oracle dm_reference when they are absent.
_dm_gpu_module = None       # dm_cuda once imported; False if it cannot be


def _dm_gpu():
    global _dm_gpu_module
    if _dm_gpu_module is None:
        try:
            _dm_gpu_module = importlib.import_module(f"{__name__}.dm_cuda")
        except ImportError:
            _dm_gpu_module = False
    return _dm_gpu_module or None


def dm_forward(A, dims, thresholds, lut):
    """Hard DM forward: the trees' codes and the LUT sum (bitwise encode_tree + lookup).

    (N, D) float32, (C, K-1) int32, (C, K-1) float32, (C, K, M) float32 ->
    (codes (N, C) uint8 or uint16, Y (N, M) float32), K = 2**d for a depth d in 1..10. The
    NumPy path raises ValueError on NaN/Inf in A (the encoder's fused check); the GPU
    path does not check.
    """
    from . import dm_reference
    if backend.is_cupy(A):
        return (_dm_gpu() or dm_reference).dm_forward(A, dims, thresholds, lut)
    dm_reference.check_dm(dims, thresholds, lut)
    codes = encode_tree(A, dims, thresholds)
    return codes, lookup(codes, lut)


def dm_backward(A, dims, thresholds, inv_tau, lut, codes, grad_Y, inv_temp,
                need_a=True, need_t=True, need_lut=True, factors=None):
    """Surrogate gradients of the DM op (semantics in :mod:`.dm_reference`).

    Parameters
    ----------
    A : (N, D) float32; dims : (C, K-1) int32; thresholds, inv_tau : (C, K-1) float32
    lut : (C, K, M) float32; codes : (N, C) uint8 (the forward's); grad_Y : (N, M) float32
    (K = 2**d leaves, d in 1..10 read from dims' width)
    inv_temp : float, 1 / softmax temperature
    need_a, need_t, need_lut : which gradients to compute
    factors : optional ``(proto (C, K, w), weight (D, M), cols (C, w), mask (C, w))`` when
        the LUT is ``proto[c] @ weight[cols[c]]`` (a factored DM layer): the leaf
        gradients may then go through the factors
        (:func:`.dm_reference.factored_leaf_gradients`). Same result either way; used on
        the CPU where M >= 4w (the leaf gradients 1.9x faster there), ignored on the GPU, where
        the one cuBLAS product is faster than the extra launches (0.83-0.88x measured,
        benchmarks/bench_dm_factored.py)

    Returns
    -------
    (grad_A (N, D) | None, grad_t (C, K-1) | None, grad_lut (C, K, M) | None), float32
    """
    from . import dm_reference
    if factors is not None:
        dm_reference.check_factors(factors, lut)
    if backend.is_cupy(A):
        mod = _dm_gpu() or dm_reference
        return mod.dm_backward(A, dims, thresholds, inv_tau, lut, codes, grad_Y, inv_temp,
                               need_a, need_t, need_lut)
    from . import dm_cpu
    dm_reference.check_dm(dims, thresholds, lut, inv_tau)
    grad_lut = lookup_backward(codes, grad_Y, lut.shape[1]) if need_lut else None
    grad_A = grad_t = None
    if need_a or need_t:
        if factors is not None and lut.shape[2] >= 4 * factors[0].shape[2]:
            G = dm_reference.factored_leaf_gradients(grad_Y, *factors)
        else:
            G = dm_reference.leaf_gradients(grad_Y, lut)      # one BLAS product
        grad_A, grad_t = dm_cpu.node_backward(A, dims, thresholds, inv_tau, G, inv_temp, need_a)
        grad_t = grad_t if need_t else None
    return grad_A, grad_t, grad_lut


def chain(layers, in_features, library="numpy"):
    """The compiled chain of 8-bit LUT layers for arrays of ``library`` ("numpy": Numba,
    :class:`.runtime_cpu.ChainCPU`; "cupy": one captured CUDA kernel per call,
    :class:`.runtime_cuda.ChainCUDA`, built on the current device).

    Parameters
    ----------
    layers : list of dicts ``dims``, ``thresholds``, ``lut``, ``scale``, ``bias`` (see
        :func:`.reference.chain`)
    in_features : int, D0, the width of the chain's input rows

    Returns
    -------
    callable ``chain(X, check_finite=True) -> Y``: X (N, D0) float32 C-contiguous of that
    library, Y (N, M_last) float32, a fresh array per call; ``check_finite`` (see
    :func:`nimbus.arrays.validate.finite_mode`): True raises ValueError on NaN/Inf in X
    (the kernel scans the rows it reads), "nan" gives NaN outputs in the rows that hold
    one, False does not look
    """
    op = OP_TABLE["chain"]
    if library == "cupy":
        return resolve(op.cuda)(layers, in_features=in_features)
    if library != "numpy":
        raise ValueError(f"library must be 'numpy' or 'cupy', got {library!r}")
    cpu = resolve(op.cpu)(layers, d_in=in_features)
    m_out = cpu.m_out

    def run(X, check_finite=True):
        mode = validate.finite_mode(check_finite)
        # ChainCPU reuses one output per batch size: the caller gets its own array
        out = np.empty((X.shape[0], m_out), dtype=np.float32)
        if mode != 2:
            return cpu(X, out=out, check_finite=bool(mode))
        try:            # the kernel's own scan costs nothing; rows are looked at only after
            return cpu(X, out=out, check_finite=True)
        except ValueError:
            bad = ~np.isfinite(X).all(axis=1)
            if not bad.any():
                raise
            Y = cpu(np.where(bad[:, None], np.float32(0), X), out=out, check_finite=False)
            Y[bad] = np.nan
            return Y
    return run
