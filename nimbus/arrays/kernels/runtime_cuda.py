"""GPU inference of a converted network: a chain of LUT layers in one kernel per call.

:class:`ChainCUDA` holds the arrays of every layer on the device (copied once, checked
once) and runs the whole chain in one kernel of ``cuda/runtime.cu``: one launch, one read
of X, one write of Y, activations kept in shared memory between layers. Two kernels give
the same bits:

* ``chain_mma_kernel`` (batches of 1024 rows and more, compute capability >= 8.0, trees of
  depth >= 2): the sums over codebooks as the product of the one-hot matrix of the codes
  (built in registers, never stored) and the LUT, on the tensor cores (mma.sync m16n8k32,
  uint8 x uint8 -> int32: exact); tiles of 128 rows, LUT chunks and the compact trees
  staged in shared memory by cp.async.
* ``chain_kernel`` (small batches, any depth): byte sums on the CUDA cores, one row per
  block below 528 rows, the lanes that share a group of 16 outputs meeting by warp
  shuffles; every layer's descriptor (always), compact trees, scale and bias (where they
  fit) copied into shared memory as it starts (the prefetch block), so that inside the
  chain only the LUT reads wait on L2.

NaN/Inf in X (``check_finite``): True, the kernel sets a flag that the host reads with a
sync and raises on; "nan", the rows that hold one come out NaN (no sync); False, no check.

The launch is captured once per (batch size, input width, check_finite) into a CUDA graph
(``cupy.cuda.Stream.begin_capture``) and replayed after. The graph's kernel reads the
addresses of X and Y and the NaN/Inf flag from a small parameter block in device memory,
written by one 24-byte host-to-device copy before each replay, so a replay reads the
caller's X in place and writes a freshly allocated Y: no input copy, no output copy, and
no result is ever overwritten by a later call.

Layer semantics (bit for bit those of :func:`.reference.encode_tree` then
:func:`.reference.lookup_q`):

* ``code[n, c]`` = leaf of row n in tree c (heap order; right iff ``x > t``; -inf
  thresholds send every row right),
* ``isum[n, m] = sum_c lut[c, code[n, c], m]`` (exact integers),
* ``y = float32(isum) * scale[m] + bias[m]`` (a float32 multiply, then a float32 add),
  the next layer's input.

CuPy is imported lazily (through :func:`nimbus.arrays.backend.cupy`). No cuBLAS call is
made inside the captured graph (CuPy refuses them under capture).

A call whose X is a C-contiguous float32 CuPy matrix on the chain's device, of a (rows,
width, check_finite) that already has a plan, skips the other input checks (they ran when
the plan was built).

Measured (one H100, the default recipe's Fashion-MNIST MLP 784-256-256-256-10, 4 inputs
per codebook, K = 16; ``benchmarks/device_runtime.sh``, benchmarks/RESULTS.md): 0.60 ms per
call at 65536 rows (cuBLAS fp32 1.20 ms, fp16 0.64 ms, a torch fp16 CUDA graph 0.31 ms);
at batch 1 / 16 / 256 with ``check_finite="nan"`` 0.014 / 0.013 / 0.018 ms host wall per
call (the torch graph: 0.026 / 0.020 / 0.021) and 0.011 / 0.012 / 0.016 ms of kernel (graph
replays); 0.035-0.036 ms with the default check (a device sync per call).
"""
from __future__ import annotations

import importlib.resources

import numpy as np

from .. import backend, validate

__all__ = ["ChainCUDA"]

NT = 256                       # threads per block (cuda/runtime.cu's NT)
_MAX_DEPTH = 10                # trees of depth 1..10 (K = 2 .. 1024 leaves)
_ROWS_MAX = 32                 # default tile: RPT = 2 at 256 outputs (119 registers, 2 blocks/SM)
_CHUNK_BYTES = 32 * 1024       # LUT bytes per staged chunk (two buffers)
_RING = 64                     # pinned parameter slots in flight (calls without a sync)
_GROUP = 8                     # slots per event: one event record per 8 calls (2.5 us each)
# chain_mma_kernel's tiles: rows per block -> threads per block (cuda/runtime.cu's NTM;
# 512 threads: one block per SM, 256: two, so that one block's encode overlaps the other's
# products)
_MMA_TILES = {128: 512, 64: 256, 32: 256}
_MMA_ROWS_AUTO = (128, 64, 32)  # tiles kernel="auto" tries, the first that gives every SM work
_MMA_MIN_BATCH = 1024          # kernel="auto" takes the tensor cores from this batch size
_MMA_CHUNK_MAX = 64 * 1024     # LUT bytes per staged chunk of chain_mma_kernel
_X_STAGE_MAX = 48 * 1024       # chain_kernel copies a tile of X this small into shared memory
_SPARE_MAX = 1 << 20           # outputs (floats) up to which a plan keeps the next call's Y ready
_SOURCE = None
_F32 = np.dtype(np.float32)
_modules = {}                  # (device id, RPT) -> cupy.RawModule


def _cp():
    cp = backend.cupy()
    if cp is None:
        raise RuntimeError("ChainCUDA needs CuPy and a CUDA device")
    return cp


def _source():
    global _SOURCE
    if _SOURCE is None:
        res = importlib.resources.files(__package__).joinpath("cuda").joinpath("runtime.cu")
        _SOURCE = res.read_text(encoding="utf-8")
    return _SOURCE


def _function(dev_id, rpt, name="chain_kernel", ntm=512, nt=NT):
    """``name`` (chain_kernel or chain_mma_kernel) compiled for device ``dev_id`` with RPT
    pairs per thread, NT threads per block of chain_kernel and NTM of chain_mma_kernel
    (cached)."""
    key = (int(dev_id), int(rpt), int(ntm), int(nt))
    mod = _modules.get(key)
    if mod is None:
        cp = _cp()
        mod = cp.RawModule(code=f"#define NT {int(nt)}\n#define RPT {int(rpt)}\n"
                           f"#define NTM {int(ntm)}\n" + _source())
        _modules[key] = mod
    return mod.get_function(name)


def _compact_tree(tree):
    """A layer's trees (C, K-1, 2) int32 {column, threshold bits} as chain_mma_kernel stages
    them in shared memory: (C, K-1) float32 thresholds, then (C, K-1) uint16 columns, each
    part zero-padded to 16 bytes. (uint8,) flat; the columns are cut to 16 bits, so the
    caller uses it only where every column is below 65536."""
    n = tree.shape[0] * tree.shape[1]
    a = -(-n * 4 // 16) * 16
    b = -(-n * 2 // 16) * 16
    out = np.zeros(a + b, dtype=np.uint8)
    out[:n * 4] = np.ascontiguousarray(tree[:, :, 1]).reshape(-1).view(np.uint8)
    out[a:a + n * 2] = tree[:, :, 0].reshape(-1).astype(np.uint16).view(np.uint8)
    return out


def _mma_lut(lut, C, K, Mp):
    """A layer's LUT (C, K, Mp) uint8 in chain_mma_kernel's operand order.

    The k = c K + code axis is zero-padded to kpad (a multiple of 32) and cut into steps of
    32; per step, per pair p of 8-column tiles, per lane (g, t) of a warp, 16 bytes:
    lut[k, n] for n = 16 p + 8 jj + g, k = 32 s + 16 h + 4 t + e, in the order (jj, h, e),
    i.e. the mma.m16n8k32 B registers {b0, b1} of tile 2p, then of tile 2p + 1.

    Returns (kpad / 32 * Mp * 32,) uint8 and kpad.
    """
    kpad = -(-C * K // 32) * 32
    Lk = np.zeros((kpad, Mp), dtype=np.uint8)
    Lk[:C * K] = lut.reshape(C * K, Mp)
    S, P = kpad // 32, Mp // 16
    B = Lk.reshape(S, 2, 4, 4, P, 2, 8).transpose(0, 4, 6, 2, 5, 1, 3)
    return np.ascontiguousarray(B).reshape(-1), kpad


def _prefetch_block(desc, checked):
    """chain_kernel's prefetch block: what every layer needs that does not depend on the
    data, in the order the kernel reads it. The descriptors ``desc`` (L, 10) uint64 (their
    device pointers already set), zero-padded to 16 bytes; then per layer its trees as
    :func:`_compact_tree` (thresholds, then uint16 columns, each part padded to 16 bytes),
    its scale (Mp,) float32 and bias (Mp,) float32. Returns (bytes,) uint8, a multiple of 16.
    ``checked``: the tuples of :func:`_check_layer`; every column below 65536."""
    head = desc.view(np.uint8).reshape(-1)
    parts = [head, np.zeros(-len(head) % 16, dtype=np.uint8)]
    for tree, _, sc, bi, *_ in checked:
        parts += [_compact_tree(tree), sc.view(np.uint8), bi.view(np.uint8)]
    return np.concatenate(parts)


def _host(a, name):
    """``a`` (NumPy or CuPy) as a NumPy array, for the one-time checks."""
    if a is None:
        raise ValueError(f"{name} is missing")
    return np.asarray(backend.to_host(a))


def _check_layer(i, layer, D):
    """One layer dict checked against its input width ``D`` (None: unknown, layer 0).

    Returns (tree (C, K-1, 2) int32, lut (C, K, Mp) uint8, scale (Mp,), bias (Mp,),
    C, depth, M, Mp).
    """
    if not isinstance(layer, dict):
        raise TypeError(f"layers[{i}] must be a dict with keys dims, thresholds, lut, scale, "
                        f"bias; got {type(layer).__name__}")
    missing = [k for k in ("dims", "thresholds", "lut", "scale", "bias") if k not in layer]
    if missing:
        raise ValueError(f"layers[{i}] lacks {', '.join(missing)}")
    dims = _host(layer["dims"], f"layers[{i}]['dims']")
    thr = _host(layer["thresholds"], f"layers[{i}]['thresholds']")
    lut = _host(layer["lut"], f"layers[{i}]['lut']")
    scale = _host(layer["scale"], f"layers[{i}]['scale']")
    bias = _host(layer["bias"], f"layers[{i}]['bias']")
    where = f"layers[{i}]"
    if dims.ndim != 2:
        raise ValueError(f"{where}['dims'] must be 2-D (C, 2**depth - 1); got shape {dims.shape}")
    C, nodes = dims.shape
    depth = (nodes + 1).bit_length() - 1
    if nodes < 1 or (1 << depth) - 1 != nodes or depth > _MAX_DEPTH:
        raise ValueError(f"{where}['dims'] has {nodes} nodes per tree; a tree of depth 1..10 "
                         f"has 2**depth - 1 (1, 3, 7, ..., 1023)")
    if C < 1:
        raise ValueError(f"{where} has no codebook (dims shape {dims.shape})")
    if dims.dtype.kind not in "iu":
        raise TypeError(f"{where}['dims'] must hold integer columns; got dtype {dims.dtype}")
    if thr.shape != dims.shape:
        raise ValueError(f"{where}['thresholds'] has shape {thr.shape}; it must match dims' "
                         f"{dims.shape}")
    if thr.dtype.kind != "f":
        raise TypeError(f"{where}['thresholds'] must be floating point; got dtype {thr.dtype}")
    thr = thr.astype(np.float32)
    if np.isnan(thr).any():
        raise ValueError(f"{where}['thresholds'] holds NaN")
    lo, hi = int(dims.min()), int(dims.max())
    if lo < 0 or (D is not None and hi >= D):
        top = "the input's columns" if D is None else f"[0, {D})"
        raise ValueError(f"{where}['dims'] must be columns in {top}; got values {lo}..{hi}")
    K = 1 << depth
    if lut.dtype != np.uint8:
        raise TypeError(f"{where}['lut'] must have dtype uint8; got {lut.dtype}")
    if lut.ndim != 3 or lut.shape[:2] != (C, K) or lut.shape[2] < 1:
        raise ValueError(f"{where}['lut'] must have shape (C={C}, K={K}, M >= 1) to match "
                         f"depth-{depth} trees; got {lut.shape}")
    M = lut.shape[2]
    for name, v in (("scale", scale), ("bias", bias)):
        if v.shape != (M,):
            raise ValueError(f"{where}['{name}'] must have shape ({M},); got {v.shape}")
        if v.dtype.kind != "f":
            raise TypeError(f"{where}['{name}'] must be floating point; got dtype {v.dtype}")
    Mp = -(-M // 16) * 16
    tree = np.empty((C, nodes, 2), dtype=np.int32)
    tree[:, :, 0] = dims
    tree[:, :, 1] = thr.view(np.int32)
    lut_p = np.zeros((C, K, Mp), dtype=np.uint8)
    lut_p[:, :, :M] = lut
    sc = np.zeros(Mp, dtype=np.float32)
    bi = np.zeros(Mp, dtype=np.float32)
    sc[:M] = scale.astype(np.float32)
    bi[:M] = bias.astype(np.float32)
    return tree, lut_p, sc, bi, C, depth, M, Mp, hi


class _Plan:
    """What one (N, D0, check) call shape needs: the graph and its parameter block."""

    __slots__ = ("graph", "params", "rows", "smem", "rpt", "grid", "chunk", "kernel", "prefetch",
                 "threads", "spare", "spare_stream")

    def __init__(self):
        self.spare = None           # the next call's Y, allocated after this call's launch
        self.spare_stream = 0       # the stream it was allocated on (the pool's stream)


class ChainCUDA:
    """A converted network's LUT layers, run on the GPU as one captured kernel per call.

    Parameters
    ----------
    layers : list of dicts, one per layer, each with (NumPy or CuPy arrays)
        ``dims`` (C, K-1) int, input column tested at each heap-ordered node (K = 2**depth,
        depth 1..10); ``thresholds`` (C, K-1) float32 (-inf allowed, NaN not);
        ``lut`` (C, K, M) uint8; ``scale``, ``bias`` (M,) float32.
        Layer l + 1 reads layer l's M outputs, so its dims must lie in [0, M_l).
    in_features : int or None, the width D0 of X. None: any X with more columns than the
        largest column the first layer tests.
    rows : int or None, rows per block (None: chosen per batch size). chain_kernel: a power
        of two 1..64; tiles of at least K rows stage the LUT through shared memory, smaller
        ones read it directly. chain_mma_kernel: 32, 64 or 128. A benchmark knob.
    chunk_bytes : int, bytes of LUT per staged chunk of chain_kernel (multiple of 16; two
        are kept).
    kernel : "auto", "simt" or "mma". "simt": chain_kernel (integer byte sums on the CUDA
        cores, any depth). "mma": chain_mma_kernel (the sums as one-hot x LUT products on
        the tensor cores; compute capability 8.0 or later, every tree of depth >= 2, layers
        of at most 1024 outputs). "auto": "mma" where it applies and the batch has at
        least ``_MMA_MIN_BATCH`` rows, else "simt". Both give the same bits.
    prefetch : bool (default True), chain_kernel copies every layer's descriptor, trees
        (compact), scale and bias into shared memory as it starts, where they fit and every
        tree column is below 65536; then only the LUT reads wait on L2 inside the chain.
        Same bits either way; False is a benchmark knob.

    The arrays are copied to the current CuPy device once; later changes to the caller's
    arrays do not reach the chain.
    """

    def __init__(self, layers, *, in_features=None, rows=None, chunk_bytes=_CHUNK_BYTES,
                 kernel="auto", prefetch=True):
        cp = _cp()
        if kernel not in ("auto", "simt", "mma"):
            raise ValueError(f"kernel must be 'auto', 'simt' or 'mma'; got {kernel!r}")
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError("layers must be a non-empty list of layer dicts")
        if in_features is not None:
            if isinstance(in_features, bool) or int(in_features) != in_features or in_features < 1:
                raise ValueError(f"in_features must be a positive int; got {in_features!r}")
            in_features = int(in_features)
        if rows is not None and (isinstance(rows, bool) or rows not in (1, 2, 4, 8, 16, 32, 64, 128)):
            raise ValueError(f"rows must be a power of two from 1 to 128 or None; got {rows!r}")
        if rows == 128 and kernel != "mma":
            raise ValueError("rows=128 is a tile of kernel='mma' only")
        if not isinstance(prefetch, (bool, np.bool_)):
            raise TypeError(f"prefetch must be True or False; got {prefetch!r}")
        if int(chunk_bytes) != chunk_bytes or chunk_bytes < 0 or chunk_bytes % 16:
            raise ValueError(f"chunk_bytes must be a non-negative multiple of 16; got {chunk_bytes!r}")
        self._dev = cp.cuda.Device().id
        self.in_features = in_features
        self._rows = rows
        self._chunk = int(chunk_bytes)
        D = in_features
        self._arrays = []           # device arrays, kept alive for the descriptors
        desc = np.zeros((len(layers), 10), dtype=np.uint64)   # cuda/runtime.cu's Layer (80 bytes)
        meta = []
        checked = []
        for i, layer in enumerate(layers):
            checked.append(_check_layer(i, layer, D))
            D = checked[-1][6]
        major = cp.cuda.runtime.getDeviceProperties(self._dev)["major"]
        why = None
        if major < 8:
            why = f"the device has compute capability {major}.x; mma needs 8.0 or later"
        elif min(c[5] for c in checked) < 2:
            why = "a layer has trees of depth 1; mma needs depth >= 2"
        elif max(c[7] for c in checked) > 1024:
            why = "a layer has more than 1024 outputs; mma takes at most 1024"
        if kernel == "mma" and why is not None:
            raise ValueError(f"kernel='mma' does not apply: {why}")
        self._mma_ok = why is None and kernel != "simt"
        self._kernel = kernel
        self._Cs_mma = 1
        D = in_features
        for i, (tree, lut, sc, bi, C, depth, M, Mp, hi) in enumerate(checked):
            if i == 0:
                self._min_width = hi + 1
            arrs = [tree, lut, sc, bi]
            kpad = 0
            if self._mma_ok:
                lutb, kpad = _mma_lut(lut, C, 1 << depth, Mp)
                arrs.append(lutb)
                arrs.append(_compact_tree(tree))
                # codebooks the kernel reads (C K padded to 32), in pairs (uint16 pairs)
                self._Cs_mma = max(self._Cs_mma, -(-(-(-kpad >> depth)) // 2) * 2)
            dev = [cp.asarray(a) for a in arrs]
            self._arrays.extend(dev)
            desc[i, :4] = [a.data.ptr for a in dev[:4]]
            ints = desc[i, 4:].view(np.int32)
            ints[:6] = [C, depth, M, Mp, -1 if D is None else D, kpad]
            if self._mma_ok:
                desc[i, 7] = dev[4].data.ptr
                desc[i, 8] = dev[5].data.ptr
                desc[i, 9:].view(np.int32)[0] = dev[5].size if hi < 65536 else 0
            if C * (1 << depth) * Mp >= 2 ** 32:
                # chain_kernel addresses a layer's LUT by 32-bit offsets
                raise ValueError(f"layer {i}: its LUT holds {C * (1 << depth) * Mp} bytes; "
                                 "the GPU chain takes at most 2**32 - 1 per layer")
            meta.append((C, depth, M, Mp))
            D = M
        self._desc = cp.asarray(desc.view(np.uint8).reshape(-1))
        self._pre, self._pre0 = None, 0
        if prefetch and all(c[8] < 65536 for c in checked):
            self._pre = cp.asarray(_prefetch_block(desc, checked))
            self._pre0 = _prefetch_block(desc, checked[:1]).size
        self._meta = meta
        self.out_features = meta[-1][2]
        self._Cs = max(m[0] for m in meta)
        # activations between layers: the widest hidden width, a whole number of 16 bytes
        hidden = [m[2] for m in meta[:-1]]
        self._Hs = -(-max(hidden) // 4) * 4 if hidden else 0
        # chain_mma_kernel's activation rows: 1 mod 32 floats (the walks of 32 rows read
        # distinct banks)
        self._Hs_mma = (-(-max(m[3] for m in meta[:-1]) // 32) * 32 if hidden else 0) + 1
        self._plans = {}
        self._cupy = cp
        self._xtype = cp.ndarray                # X's type on the fast path of __call__
        # pinned parameter slots {X, Y, flag}: the copy before each replay reads one; a group
        # of _GROUP slots is reused only after the event recorded behind its last copy (or a
        # sync) has passed
        self._pinned = cp.cuda.alloc_pinned_memory(_RING * 32)
        self._slots = np.frombuffer(self._pinned, dtype=np.uint64, count=_RING * 4).reshape(_RING, 4)
        self._events = [None] * (_RING // _GROUP)
        self._next = 0
        self._stream, self._stream_ptr = None, None
        self._flag_pinned = cp.cuda.alloc_pinned_memory(16)
        self._flag_host = np.frombuffer(self._flag_pinned, dtype=np.int32, count=4)

    # ------------------------------------------------------------------ planning
    def _tile(self, N, dev_sms):
        """(rows, RPT, shared bytes) for a batch of N rows."""
        if self._rows is not None:
            R = self._rows
        else:   # the largest tile that still gives about two blocks per SM
            R = 1
            while R * 2 <= _ROWS_MAX and N // (R * 2) >= 2 * dev_sms:
                R *= 2
        return R, self._tile_fit(R)

    def _tile_fit(self, R):
        """(RPT, shared bytes, chunk bytes, threads) of chain_kernel at R rows."""
        nt = NT
        G = [m[3] // 16 for m in self._meta]
        rpt = max(1, max(-(-R * g // nt) for g in G))
        if rpt > 4:
            raise ValueError(f"rows={R}: a layer of {max(G) * 16} (padded) outputs needs more "
                             f"than 4 pairs per thread; use fewer rows")
        rpt = 1 if rpt == 1 else (2 if rpt == 2 else 4)
        # the kernel stages a layer's LUT when K <= rows and one codebook fits a chunk; with
        # no such layer it gets chunk 0 and no buffers (the same rule, decided in the kernel)
        staged = any((1 << d) <= R and (1 << d) * Mp <= self._chunk for _, d, _, Mp in self._meta)
        chunk = self._chunk if staged else 0
        codes = -(-R * self._Cs * 4 // 16) * 16          # uint32 LUT row offsets
        smem = 2 * chunk + R * self._Hs * 4 + codes
        return rpt, smem, chunk, nt

    def _mma_fit(self, R, optin, per_sm, mode=0):
        """(shared bytes, chunk bytes) of chain_mma_kernel at R rows, or None if it does not
        fit: R/32 x ceil(Mp/64) warp tasks at most one per warp, one k32 step per chunk at
        least; two blocks per SM where a tile of 256 threads fits twice, else one."""
        ntm = _MMA_TILES[R]
        if max(R // 32 * -(-m[3] // 64) for m in self._meta) > ntm // 32:
            return None
        rest = R * self._Hs_mma * 4 + -(-(self._Cs_mma * (R + 2) * 2) // 16) * 16
        rest += R * 4 if mode == 2 else 0          # the row flags of check_finite="nan"
        step = max(m[3] * 32 for m in self._meta)
        for blocks in sorted({512 // ntm, 1}, reverse=True):
            budget = min(optin, per_sm // blocks - 1024)
            # (a multiple of 128 bytes: every cp.async destination keeps its source's
            # 128-byte alignment)
            chunk = min(_MMA_CHUNK_MAX, (budget - rest) // 256 * 128)
            if chunk >= step:
                return 2 * chunk + rest, chunk
        return None

    def _plan_mma(self, N, D0, mode, sms, optin, per_sm):
        """The chain_mma_kernel plan for N rows, or None where it does not apply."""
        if not self._mma_ok or (self._kernel == "auto" and N < _MMA_MIN_BATCH):
            return None
        if self._rows is not None:
            fits = [(self._rows, self._mma_fit(self._rows, optin, per_sm, mode))] \
                if self._rows in _MMA_TILES else []
        else:   # the largest tile that still gives every SM two blocks' work
            fits = [(R, self._mma_fit(R, optin, per_sm, mode)) for R in _MMA_ROWS_AUTO
                    if R == 32 or N >= R * sms * 2]
        fits = [(R, f) for R, f in fits if f is not None]
        if not fits:
            if self._kernel == "mma":
                raise ValueError(
                    f"kernel='mma' does not fit this chain at rows={self._rows or 32}: a block "
                    f"holds at most {_MMA_TILES.get(self._rows, 512) // 32} warp tasks of 32 rows x 64 outputs, and its "
                    f"activations, codes and two LUT steps must fit {optin} shared bytes")
            return None
        R, (smem, chunk) = fits[0]
        kern = _function(self._dev, 1, "chain_mma_kernel", _MMA_TILES[R])
        if smem > 48 * 1024:
            kern.max_dynamic_shared_size_bytes = int(smem)
        plan = _Plan()
        plan.params = _cp().zeros(4, dtype=np.uint64)
        plan.rows, plan.rpt, plan.smem, plan.chunk, plan.kernel = R, 0, smem, chunk, "mma"
        plan.prefetch = 0
        plan.threads = _MMA_TILES[R]
        plan.grid = -(-N // R)
        args = (self._desc, np.int32(len(self._meta)), plan.params, np.int32(N), np.int32(D0),
                np.int32(R), np.int32(self._Hs_mma), np.int32(self._Cs_mma), np.int32(chunk),
                np.int32(mode))
        plan.graph = self._capture(kern, plan.grid, _MMA_TILES[R], args, smem)
        return plan

    def _capture(self, kern, grid, threads, args, smem):
        cp = _cp()
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                kern((grid,), (threads,), args, shared_mem=int(smem))
            finally:
                graph = stream.end_capture()
        stream.synchronize()
        return graph

    def _plan(self, N, D0, mode):
        cp = _cp()
        key = (N, D0, mode)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        rt = cp.cuda.runtime
        sms = rt.deviceGetAttribute(16, self._dev)          # multiprocessors
        optin = rt.deviceGetAttribute(97, self._dev)        # opt-in shared bytes per block
        per_sm = rt.deviceGetAttribute(81, self._dev)       # shared bytes per SM
        plan = self._plan_mma(N, D0, mode, sms, optin, per_sm)
        if plan is not None:
            self._plans[key] = plan
            return plan
        R, (rpt, smem, chunk, nt) = self._tile(N, sms)
        while smem > optin and R > 1 and self._rows is None:
            R //= 2
            rpt, smem, chunk, nt = self._tile_fit(R)
        # the tile of X copied into shared memory once (the first layer's walks then read
        # shared memory) where it is small and fits
        xst = -(-R * D0 // 4) * 4
        if xst * 4 > _X_STAGE_MAX or smem + xst * 4 > optin:
            xst = 0
        smem += xst * 4
        smem += -(-R * 4 // 16) * 16 if mode == 2 else 0     # the row flags of "nan"
        # every layer's descriptor staged as the kernel starts, and its trees, scale and
        # bias where they fit beside the rest
        trees = self._pre is not None and smem + -(-self._pre.size // 128) * 128 <= optin
        pre_src = self._pre if trees else self._desc
        pre = int(pre_src.size)
        pre0 = self._pre0 if trees else pre        # what layer 0 needs of it, awaited first
        smem += -(-pre // 128) * 128                # (the LUT chunks stay 128-byte aligned)
        if smem > optin:
            raise ValueError(f"the chain needs {smem} bytes of shared memory per block at "
                             f"{R} rows; the device allows {optin} (layers too wide)")
        kern = _function(self._dev, rpt, nt=nt)
        if smem > 48 * 1024:
            kern.max_dynamic_shared_size_bytes = int(smem)
        plan = _Plan()
        plan.params = cp.zeros(4, dtype=np.uint64)          # {X, Y, flag|pad, unused}
        plan.rows, plan.rpt, plan.smem, plan.chunk, plan.kernel = R, rpt, smem, chunk, "simt"
        plan.grid = -(-N // R)
        args = (self._desc, np.int32(len(self._meta)), plan.params, np.int32(N), np.int32(D0),
                np.int32(R), np.int32(self._Hs), np.int32(self._Cs), np.int32(chunk),
                np.int32(mode), np.int32(xst), pre_src, np.int32(pre), np.int32(pre0))
        plan.prefetch = pre if trees else 0
        plan.threads = nt
        plan.graph = self._capture(kern, plan.grid, nt, args, smem)
        self._plans[key] = plan
        return plan

    # ------------------------------------------------------------------ calls
    def __call__(self, X, check_finite=True):
        """Logits of the chain for the rows of X.

        Parameters
        ----------
        X : (N, D0) CuPy float32 array on the chain's device (float16 is cast to float32
            first; a non-contiguous X is copied)
        check_finite : True, "nan" or False. True: raise ValueError "X holds NaN or Inf"
            after the run if X holds one (the one device sync of the call: a 4-byte read
            of a flag that the kernel sets while it reads X). "nan": every output of a
            row whose input holds NaN or Inf is NaN, the other rows are unchanged; the
            call only enqueues work (no sync), as with False, which does not look.

        Returns
        -------
        Y : (N, M_last) CuPy float32, a fresh array (later calls never overwrite it)
        """
        mode = 1 if check_finite is True else (0 if check_finite is False
                                                else validate.finite_mode(check_finite))
        # the common case in a few reads: a C-contiguous float32 matrix on the chain's device
        # whose (rows, width, mode) already has a plan, i.e. passed every check below once
        plan = None
        if type(X) is self._xtype and X.ndim == 2 and X.dtype == _F32 \
                and X.flags.c_contiguous and X.data.device_id == self._dev:
            plan = self._plans.get((X.shape[0], X.shape[1], mode))
        if plan is None:
            X = self._admit(X)
            if X.shape[0] == 0:
                return _cp().empty((0, self.out_features), dtype=np.float32)
            plan = self._plan(X.shape[0], X.shape[1], mode)
        return self._launch(plan, X, mode)

    def _admit(self, X):
        """X checked (every rule of __call__) and made C-contiguous float32."""
        cp = _cp()
        if not backend.is_cupy(X):
            raise TypeError(f"X must be a CuPy array on the GPU; got {type(X).__name__}")
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (rows, features); got shape {tuple(X.shape)}")
        if X.dtype == np.float16:
            X = X.astype(np.float32)
        elif X.dtype != np.float32:
            raise TypeError(f"X must be float32 (or float16); got dtype {X.dtype}")
        if X.data.device_id != self._dev:
            raise ValueError(f"X is on device {X.data.device_id}; the chain lives on device "
                             f"{self._dev}")
        N, D0 = X.shape
        if self.in_features is not None and D0 != self.in_features:
            raise ValueError(f"X has {D0} columns; the chain expects {self.in_features}")
        if D0 < self._min_width:
            raise ValueError(f"X has {D0} columns; the first layer tests column "
                             f"{self._min_width - 1}")
        if N > 2 ** 31 - 1 or N * max(D0, self.out_features) > 2 ** 62:
            raise ValueError(f"X has {N} rows: too many for one call")
        if not X.flags.c_contiguous:
            X = cp.ascontiguousarray(X)
        return X

    def _launch(self, plan, X, mode):
        """Y for the checked X: the parameter copy and the graph launch (and with mode 1 the
        flag's read and the sync)."""
        cp = self._cupy
        stream = cp.cuda.get_current_stream()
        # Y: the one this plan allocated after its last launch (on this stream: CuPy's pool
        # hands memory back to the stream it was allocated on), so the allocation is not
        # between the call's start and its first enqueued copy; each is handed out once
        Y = plan.spare
        if Y is None or plan.spare_stream != stream.ptr:
            Y = cp.empty((X.shape[0], self.out_features), dtype=_F32)
        plan.spare = None
        rt = cp.cuda.runtime
        if stream.ptr != self._stream_ptr:
            # the slots' events cover one stream: let the other stream's copies pass first
            if self._stream is not None:
                self._stream.synchronize()
            self._stream, self._stream_ptr = stream, stream.ptr
        i = self._next
        self._next = (i + 1) % _RING
        g, at = divmod(i, _GROUP)
        if at == 0:
            ev = self._events[g]
            if ev is not None and not ev.done:
                ev.synchronize()             # the group's copies of the last round not yet read
        slot = self._slots[i]
        slot[0] = X.data.ptr
        slot[1] = Y.data.ptr
        slot[2] = 0                          # the flag
        rt.memcpyAsync(plan.params.data.ptr, self._pinned.ptr + 32 * i, 24,
                       rt.memcpyHostToDevice, stream.ptr)
        plan.graph.launch(stream)
        if mode == 1:
            rt.memcpyAsync(self._flag_pinned.ptr, plan.params.data.ptr + 16, 4,
                           rt.memcpyDeviceToHost, stream.ptr)
            stream.synchronize()             # every slot's copy has passed too
            if self._flag_host[0]:
                raise ValueError("X holds NaN or Inf")
        elif at == _GROUP - 1:               # (a sync above covers the group as well)
            ev = self._events[g]
            if ev is None:
                ev = self._events[g] = cp.cuda.Event(block=False, disable_timing=True)
            ev.record(stream)
        if Y.size <= _SPARE_MAX:
            plan.spare = cp.empty(Y.shape, dtype=_F32)
            plan.spare_stream = stream.ptr
        return Y

    def plan_info(self, N, D0=None, check_finite=True):
        """The launch of a batch of N rows: dict kernel, rows, rpt, shared_bytes, blocks,
        chunk (builds the plan if needed)."""
        D0 = self.in_features if D0 is None else D0
        if D0 is None:
            raise ValueError("give D0 (the chain was built without in_features)")
        # (a plan is built only for inputs a call would accept: __call__'s fast path trusts
        # every cached plan's shape)
        if self.in_features is not None and D0 != self.in_features:
            raise ValueError(f"D0={D0}; the chain expects {self.in_features} columns")
        if D0 < self._min_width:
            raise ValueError(f"D0={D0}; the first layer tests column {self._min_width - 1}")
        if int(N) < 1:
            raise ValueError(f"N must be at least 1; got {N}")
        p = self._plan(int(N), int(D0), validate.finite_mode(check_finite))
        return dict(kernel=p.kernel, rows=p.rows, rpt=p.rpt, shared_bytes=p.smem, blocks=p.grid,
                    chunk=p.chunk, prefetch_bytes=p.prefetch, threads=p.threads)
