"""The float baselines of ``bench_e2e.py``: the trained float MLP as the runtimes users
pick today (plain NumPy/BLAS, ONNX Runtime fp32 and int8, cuBLAS through CuPy, a
PyTorch CUDA graph).

Every baseline runs the same arithmetic: the float model with each BatchNorm folded
into the Linear before it (``W' = W * a``, ``b' = b * a + c`` where the BatchNorm in
evaluation mode is ``x * a + c``), then ``h = max(h @ W' + b', 0)`` per hidden layer
and ``h @ W' + b'`` for the last. Folding is what a user deploying the float model
does, so the baselines are not charged for an extra pass per BatchNorm.

onnx, onnxruntime, cupy and torch are imported inside the functions that need them:
this module imports with NumPy alone, and the library never imports any of them.
"""
from __future__ import annotations

import numpy as np


# ------------------------------------------------------------------ the float model
def fold_float_mlp(model):
    """The float MLP as folded dense layers.

    Parameters
    ----------
    model : nimbus.nn.Sequential of Linear, BatchNorm, ReLU (and Flatten/Dropout,
        which inference skips), as ``nimbus/nn/cli.py`` ``build_mlp`` makes; not converted

    Returns
    -------
    list of (W, b, relu): W (D_in, D_out) float32 C-contiguous, b (D_out,) float32,
    relu bool (whether max(., 0) follows)

    Raises
    ------
    TypeError if the model is not a Sequential; ValueError naming the module that
    cannot be folded (a converted layer, a BatchNorm or ReLU with no Linear before
    it, a convolution).
    """
    from nimbus.arrays import backend
    from nimbus.nn import BatchNorm, Dropout, Flatten, Linear, ReLU, Sequential
    if not isinstance(model, Sequential):
        raise TypeError(f"the float model must be a nimbus.nn.Sequential, got "
                        f"{type(model).__name__}")
    layers = []
    for i, m in enumerate(model.layers):
        if isinstance(m, Linear):
            if m.mode != "exact" or m.weight is None:
                raise ValueError(f"layer {i} ({m!r}) is converted: --float needs the float "
                                 "model saved before conversion")
            W = backend.to_host(m.weight.data).astype(np.float64)
            b = (np.zeros(W.shape[1]) if m.bias is None
                 else backend.to_host(m.bias.data).astype(np.float64))
            layers.append([W, b, False])
        elif isinstance(m, BatchNorm):
            if not layers or layers[-1][2]:
                raise ValueError(f"layer {i} ({m!r}) does not follow a Linear: cannot fold it")
            a, c = (backend.to_host(v).astype(np.float64) for v in m.affine())
            layers[-1][0] = layers[-1][0] * a[None, :]
            layers[-1][1] = layers[-1][1] * a + c
        elif isinstance(m, ReLU):
            if not layers or layers[-1][2]:
                raise ValueError(f"layer {i} (ReLU) does not follow a Linear: cannot fold it")
            layers[-1][2] = True
        elif isinstance(m, (Flatten, Dropout)):
            continue                       # no-ops on (N, D) rows in evaluation mode
        else:
            raise ValueError(f"layer {i} ({type(m).__name__}) is not Linear/BatchNorm/ReLU: "
                             "bench_e2e benchmarks MLPs only")
    if not layers:
        raise ValueError("the float model has no Linear layer")
    # folded in float64, stored in float32: the folding itself adds no rounding of note
    return [(np.ascontiguousarray(W, np.float32), np.asarray(b, np.float32), bool(r))
            for W, b, r in layers]


def numpy_mlp(layers):
    """``fn(X) -> logits``: the folded MLP as NumPy/BLAS calls.

    X : (N, D) float32 C-contiguous; logits : (N, M_last) float32. BLAS threads are
    whatever the process has (bench_e2e sets them per subprocess).
    """
    def run(X):
        h = X
        for W, b, relu in layers:
            h = h @ W
            h += b                          # in place: one temporary per layer, as a user writes it
            if relu:
                np.maximum(h, 0, out=h)
        return h
    return run


# ------------------------------------------------------------------ ONNX Runtime
def onnx_model(layers, opset=17):
    """The folded MLP as an ONNX ModelProto: MatMul + Add (+ Relu) per layer.

    Input ``X`` (N, D) float32 with a symbolic batch axis, output ``logits``
    (N, M_last) float32; weights are initializers.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    nodes, inits = [], []
    h = "X"
    for i, (W, b, relu) in enumerate(layers):
        inits += [numpy_helper.from_array(W, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(layers) - 1
        mm, add = f"mm{i}", ("logits" if last and not relu else f"add{i}")
        nodes += [helper.make_node("MatMul", [h, f"W{i}"], [mm]),
                  helper.make_node("Add", [mm, f"b{i}"], [add])]
        h = add
        if relu:
            h = "logits" if last else f"relu{i}"
            nodes.append(helper.make_node("Relu", [add], [h]))
    D, M = layers[0][0].shape[0], layers[-1][0].shape[1]
    graph = helper.make_graph(
        nodes, "nimbus_float_mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", M])],
        initializer=inits)
    # IR version 8 is the oldest that carries opset 17: every onnxruntime that knows
    # opset 17 reads it, whatever IR version the installed onnx would write by default
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=8, producer_name="nimbus bench_e2e")
    onnx.checker.check_model(model)
    return model


def onnx_int8(model, folder):
    """``quantize_dynamic`` (QInt8 weights, activations quantized per call) of an
    fp32 ModelProto; returns the path of the int8 model written under ``folder``."""
    import logging
    import os

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src, dst = os.path.join(folder, "mlp_fp32.onnx"), os.path.join(folder, "mlp_int8.onnx")
    onnx.save(model, src)
    # quantize_dynamic logs a hint about pre-processing (shape inference) to the root
    # logger; the graph's shapes are all known, so the hint does not apply here
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return dst


def ort_runner(model, threads):
    """``fn(X) -> logits`` through an onnxruntime CPU InferenceSession.

    model : ModelProto or path; threads : intra-op threads (inter-op 1, sequential
    execution: the graph is a chain, there is nothing to run side by side).
    """
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = [sess.get_outputs()[0].name]
    return lambda X: sess.run(out, {name: X})[0]


# ------------------------------------------------------------------ GPU
def cupy_mlp(layers, dtype):
    """``fn(X) -> logits`` as cuBLAS GEMMs through CuPy.

    X : (N, D) float32 CuPy array; logits : (N, M_last) float32 CuPy array. With
    ``dtype=float16`` the weights are half, the input is cast to half inside the call
    and the logits back to float32 (a user's fp32 data in, fp32 logits out); the GEMMs
    then take the tensor cores. Bias and ReLU run as one fused elementwise kernel per
    layer (in place), so the baseline is not charged for separate add and max passes.
    """
    import cupy as cp
    dev = [(cp.asarray(W, dtype=dtype), cp.asarray(b, dtype=dtype), relu)
           for W, b, relu in layers]
    # float arithmetic for both dtypes: float16 has no max() overload in CuPy's headers
    bias_relu = cp.ElementwiseKernel(
        "T b", "T y", "float v = (float)y + (float)b; y = (T)(v > 0.f ? v : 0.f);",
        "nimbus_bench_bias_relu")
    bias = cp.ElementwiseKernel("T b", "T y", "y = (T)((float)y + (float)b);",
                                "nimbus_bench_bias")

    def run(X):
        h = X if X.dtype == dtype else X.astype(dtype)
        for W, b, relu in dev:
            h = h @ W
            (bias_relu if relu else bias)(b, h)
        return h if h.dtype == np.float32 else h.astype(np.float32)
    return run


def torch_graph_fp16(layers, batch):
    """The fp16 MLP captured in a ``torch.cuda.CUDAGraph`` for one batch size.

    Parameters
    ----------
    layers : folded layers (see :func:`fold_float_mlp`)
    batch : int, rows of the static input

    Returns
    -------
    (fn, torch) : fn(X) copies X (a (batch, D) float32 torch tensor) into the static
    half input and replays the graph; returns the static (batch, M_last) half output.
    Raises ImportError when torch is not importable.
    """
    import torch
    dev = torch.device("cuda", torch.cuda.current_device())
    Ws = [(torch.as_tensor(W, device=dev).half(), torch.as_tensor(b, device=dev).half(), r)
          for W, b, r in layers]
    static_in = torch.zeros((batch, layers[0][0].shape[0]), device=dev, dtype=torch.float16)

    def forward():
        h = static_in
        for W, b, relu in Ws:
            h = torch.addmm(b, h, W)
            if relu:
                h = torch.relu_(h)
        return h

    # warm-up on a side stream before capture, as PyTorch's CUDA-graph notes ask
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward()

    def run(X):
        static_in.copy_(X)                  # fp32 -> fp16 cast inside the timed call
        graph.replay()
        return static_out
    return run, torch
