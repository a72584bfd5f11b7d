"""End-to-end inference: the converted network, compiled, against the float network in the
runtimes users pick today -- the whole network as a user runs it, same data, same threads,
one run.

CPU (always, unless --no-cpu), batches 1, 16, 256, 4096 of real test rows, at 1 thread
and at all cores (each thread count in its own subprocess, with the BLAS/OpenMP/Numba
thread variables set before NumPy loads):

  (a) NumPy/BLAS fp32: the float model with BatchNorm folded into the Linear weights,
      ``h = max(h @ W + b, 0)`` per hidden layer;
  (b) ONNX Runtime fp32: that folded model as an ONNX graph (MatMul + Add + Relu, opset
      17), ``intra_op_num_threads`` = threads;
  (c) ONNX Runtime int8: ``quantize_dynamic(QuantType.QInt8)`` of (b);
  (d) ours: ``nimbus.nn.compile`` of the converted model (``numba.set_num_threads``);
      the uncompiled ``model(X)`` when this nimbus has no ``compile`` (printed).

GPU (``--gpu``, needs CuPy and a CUDA device), batches 1, 16, 256, 4096, 65536:
  (d) ours compiled on CuPy input, ``check_finite=True`` (the default), ``"nan"`` (NaN rows,
      no sync) and ``False``;
  (e) cuBLAS fp32 and fp16 GEMMs through CuPy (fused bias + ReLU kernel per layer);
  (f) the fp16 MLP captured in a ``torch.cuda.CUDAGraph`` (if ``import torch`` works).
  Device time by CUDA events around each call and host wall time per call (a loop of
  calls, one sync at the end, divided by the calls); medians after warm-up.

Each cell: median of per-call times after 3 warm-up calls, with enough calls for at least
``--min-time`` seconds (0.2 by default); on the CPU the methods' calls take turns in
``--rounds`` rounds (5), so a change in the machine's load falls on all of them alike;
on the GPU likewise in ``--gpu-rounds`` rounds (3), each figure the median of the rounds'.
On a quiet machine use ``--rounds 1`` with more than one thread: ONNX Runtime's pool
threads spin-wait after each run (its default) and take the other cores from the next
method's threads when the methods alternate. Ratios are
baseline ms / ours ms (> 1: ours is faster). Also printed: each model's test accuracy
and the fraction of test rows whose argmax equals the float model's. A baseline that
cannot run (no onnxruntime, no torch, no GPU) is skipped with one printed line.

Models: ``--float FLOAT.npz --converted CONV.npz`` (``nimbus.save``'d; the converted one
may also be a saved compiled model), or ``--make DIR [--quick] [--seed S]`` to train the
float MLP, convert a copy as ``python -m nimbus convert`` does, and save both into DIR.
The data set follows the model's input width: 64 = sklearn digits (the split of
``--seed``: pass the seed the models were made with), 784 = Fashion-MNIST.

Usage::

    python benchmarks/bench_e2e.py --make /tmp/e2e --quick          # small, minutes
    python benchmarks/bench_e2e.py --float F.npz --converted C.npz --gpu --json out.json

onnx and onnxruntime: ``pip install cumulonimbus[bench]``; torch is optional.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

CPU_BATCHES = (1, 16, 256, 4096)
GPU_BATCHES = (1, 16, 256, 4096, 65536)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS")
CPU_METHODS = (("numpy", "NumPy fp32"), ("ort_fp32", "ORT fp32"), ("ort_int8", "ORT int8"),
               ("ours", "ours"))
GPU_METHODS = (("ours", "ours"), ("ours_nan", "ours check_finite='nan'"),
               ("ours_nocheck", "ours check_finite=False"),
               ("cublas_fp32", "cuBLAS fp32"), ("cublas_fp16", "cuBLAS fp16"),
               ("torch_graph_fp16", "torch CUDA graph fp16"))


# ====================================================================== models and data
def _recipe(quick):
    """The library's recipe (``nimbus.nn.recipe``: DEFAULT, or QUICK for digits), as
    ``python -m nimbus convert`` uses it. Returns (hidden widths, fit kwargs, recipe)."""
    from nimbus.nn import recipe as R
    r = R.QUICK if quick else R.DEFAULT
    hidden = [64, 32] if quick else [256, 256, 256]
    fit_kw = {"epochs": r.float_epochs, "batch_size": r.batch_size, "lr": r.float_lr,
              "input_noise": r.float_noise}
    return hidden, fit_kw, r


def _load_data(kind, seed):
    """(X_train, y_train, X_test, y_test) of "digits" or "fashion" (float32 rows, int64)."""
    from nimbus.nn import data
    if kind == "digits":
        return data.load_digits(random_state=seed)
    try:
        return data.load_fashion_mnist()
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}")


def make_models(folder, quick, seed):
    """Train the float MLP, save it, convert a copy and save that; returns both paths."""
    import nimbus
    from nimbus.nn import convert, fit
    from nimbus.nn.cli import build_mlp
    os.makedirs(folder, exist_ok=True)
    kind = "digits" if quick else "fashion"
    Xtr, ytr, Xte, yte = _load_data(kind, seed)
    hidden, fit_kw, recipe = _recipe(quick)
    sizes = [Xtr.shape[1]] + hidden + [int(ytr.max()) + 1]
    model = build_mlp(sizes, seed=seed)
    print(f"make: training the float MLP {'-'.join(map(str, sizes))} on {kind} (seed {seed})",
          flush=True)
    t0 = time.perf_counter()
    fit(model, Xtr, ytr, random_state=seed, verbose=False, **fit_kw)
    float_path = os.path.join(folder, "float.npz")
    nimbus.save(model, float_path)
    # convert modifies its model in place: convert a copy read back from the file
    conv = nimbus.load(float_path)
    print(f"make: float trained in {time.perf_counter() - t0:.1f} s; converting with the "
          f"library recipe ({recipe})", flush=True)
    t0 = time.perf_counter()
    report = convert(conv, Xtr, ytr, recipe=recipe, validation=(Xte, yte), random_state=seed,
                     verbose=False)
    conv_path = os.path.join(folder, "converted.npz")
    nimbus.save(conv, conv_path)
    print(f"make: converted in {time.perf_counter() - t0:.1f} s: float "
          f"{100 * report.float_accuracy:.2f}% -> {100 * report.final_accuracy:.2f}%; "
          f"saved {float_path} and {conv_path}", flush=True)
    return float_path, conv_path


class _Uncompiled:
    """The converted model called as is (a stand-in while ``nimbus.nn.compile`` is absent)."""

    def __init__(self, model):
        self.model = model.eval()

    def __call__(self, X, check_finite=True):
        return self.model(X)


def _ours(model, gpu=False):
    """(callable, label): the converted model compiled by ``nimbus.nn.compile`` when this
    nimbus has it, else the uncompiled model; ``callable(X, check_finite=...)``."""
    import nimbus.nn
    from nimbus.nn import Module
    if not isinstance(model, Module):
        return model, "compiled (saved artifact)"          # nimbus.load gave a compiled model
    compile_fn = getattr(nimbus.nn, "compile", None)
    if compile_fn is None:
        print("ours: this nimbus has no nimbus.nn.compile; timing the uncompiled model(X)",
              flush=True)
        return _Uncompiled(model.to("cupy") if gpu else model), "uncompiled model(X)"
    try:
        return compile_fn(model), "compiled"
    except (ValueError, TypeError, NotImplementedError) as exc:
        print(f"ours: nimbus.nn.compile failed ({type(exc).__name__}: {exc}); timing the "
              "uncompiled model(X)", flush=True)
        return _Uncompiled(model.to("cupy") if gpu else model), "uncompiled model(X)"


def _load_models(args):
    """(folded float layers, float Module, converted model or compiled artifact, data kind)."""
    import nimbus
    from _baselines import fold_float_mlp
    fmodel = nimbus.load(args.float).eval()
    layers = fold_float_mlp(fmodel)
    conv = nimbus.load(args.converted)
    if hasattr(conv, "eval"):
        conv.eval()
    D = layers[0][0].shape[0]
    kind = args.data
    if kind == "auto":
        kind = {64: "digits", 784: "fashion"}.get(D)
        if kind is None:
            raise SystemExit(f"error: cannot tell the data set of a model with {D} inputs "
                             "(64: digits, 784: Fashion-MNIST); pass --data")
    return layers, fmodel, conv, kind


def _weight_bytes(path):
    """Bytes of the float model's weights and biases as float32 (BatchNorm folded)."""
    import nimbus
    from _baselines import fold_float_mlp
    return int(sum(4 * (W.size + b.size) for W, b, _ in fold_float_mlp(nimbus.load(path))))


def _rows(X, n):
    """The first n rows of X, repeated when X has fewer (C-contiguous float32 copy)."""
    import numpy as np
    idx = np.arange(n) % X.shape[0]
    return np.ascontiguousarray(X[idx], dtype=np.float32)


# ====================================================================== timing
def _calls_for(est_s, min_time, lo=10, hi=200000):
    return int(min(max(math.ceil(min_time / max(est_s, 1e-7)), lo), hi))


def time_cpu(methods, X, min_time, rounds=5):
    """Per-call CPU times of every method on X, interleaved.

    methods : {name: fn}; each fn(X) is called 3 times to warm up, then its calls (enough
    for ``min_time`` seconds, at least 10) are split into ``rounds`` rounds that take turns
    with the other methods', so that a change in the machine's load (other processes on
    shared cores) falls on every method alike instead of on whichever ran then.

    Returns {name: (median ms, 25th percentile ms, 75th percentile ms, calls)}.
    """
    import numpy as np
    pc = time.perf_counter
    per_round, times = {}, {}
    for name, fn in methods.items():
        for _ in range(3):
            fn(X)
        t0 = pc()
        fn(X)
        n = _calls_for(pc() - t0, min_time)
        per_round[name] = math.ceil(n / rounds)
        times[name] = []
    for _ in range(rounds):
        for name, fn in methods.items():
            buf = np.empty(per_round[name])
            for i in range(buf.size):
                t0 = pc()
                fn(X)
                buf[i] = pc() - t0
            times[name].append(buf)
    out = {}
    for name, parts in times.items():
        t = np.concatenate(parts) * 1e3
        q25, q50, q75 = np.percentile(t, [25, 50, 75])
        out[name] = (float(q50), float(q25), float(q75), int(t.size))
    return out


def time_gpu(fn, X, min_time, events):
    """(device ms, host wall ms, calls) of ``fn(X)`` on the GPU.

    events : "cupy" or "torch", whose CUDA events (on the current stream) time each call.
    Device time: the median over calls of the event interval around one call. Host wall
    time: perf_counter around ``calls`` back-to-back calls with one sync at the end.
    """
    import numpy as np
    if events == "torch":
        import torch

        def event():
            return torch.cuda.Event(enable_timing=True)

        def sync():
            torch.cuda.synchronize()
    else:
        import cupy as cp

        def event():
            return cp.cuda.Event()

        def sync():
            cp.cuda.get_current_stream().synchronize()
    for _ in range(3):
        fn(X)
    sync()
    t0 = time.perf_counter()
    fn(X)
    sync()
    n = _calls_for(time.perf_counter() - t0, min_time, lo=30, hi=20000)
    dev = np.empty(n)
    for i in range(n):
        start, end = event(), event()
        start.record()
        fn(X)
        end.record()
        end.synchronize()
        dev[i] = (start.elapsed_time(end) if events == "torch"
                  else cp.cuda.get_elapsed_time(start, end))
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn(X)
    sync()
    wall = (time.perf_counter() - t0) / n * 1e3
    return float(np.median(dev)), wall, n


def _argmax_all(fn, X, to_host, chunk=4096):
    """argmax of fn over X's rows in chunks: (N,) int64 NumPy."""
    import numpy as np
    out = [np.asarray(to_host(fn(X[s:s + chunk]))).argmax(axis=1)
           for s in range(0, X.shape[0], chunk)]
    return np.concatenate(out).astype(np.int64)


# ====================================================================== CPU (one thread count)
def cpu_worker(args):
    """Time every CPU method at one thread count; write the figures to ``args._result``."""
    import numpy as np

    from _baselines import numpy_mlp, onnx_int8, onnx_model, ort_runner
    threads = args._worker
    limiter, blas = None, None
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
        limiter = threadpool_limits(limits=threads)      # held for the whole worker
        blas = [{k: d.get(k) for k in ("internal_api", "num_threads")}
                for d in threadpool_info()]
    except ImportError:
        pass                                              # the env variables did it
    import numba
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))

    layers, fmodel, conv, kind = _load_models(args)
    _, _, Xte, yte = _load_data(kind, args.seed)
    print(f"[threads={threads}] data {kind}: {Xte.shape[0]} test rows; BLAS {blas}; numba "
          f"{numba.get_num_threads()} threads", flush=True)

    methods, notes = {}, {}
    methods["numpy"] = numpy_mlp(layers)
    proto = None
    try:
        import onnxruntime  # noqa: F401
        proto = onnx_model(layers)
        methods["ort_fp32"] = ort_runner(proto, threads)
    except Exception as exc:                # not installed, or an ONNX/ORT failure
        hint = " (pip install onnx onnxruntime)" if isinstance(exc, ImportError) else ""
        notes["ort_fp32"] = f"skipped ONNX Runtime fp32: {type(exc).__name__}: {exc}{hint}"
        print(notes["ort_fp32"], flush=True)
    if proto is not None:
        try:
            # the session holds the model in memory: the folder can go at once
            with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
                methods["ort_int8"] = ort_runner(onnx_int8(proto, tmp), threads)
        except Exception as exc:
            notes["ort_int8"] = f"skipped ONNX Runtime int8: {type(exc).__name__}: {exc}"
            print(notes["ort_int8"], flush=True)
    ours, label = _ours(conv)
    methods["ours"] = lambda X: ours(X)
    notes["ours"] = label

    # the folded NumPy MLP must be the float model: a wrong fold would bias every ratio
    Xcheck = _rows(Xte, min(Xte.shape[0], 1024))
    ref = np.asarray(fmodel(Xcheck))
    checks = {}
    for name, fn in methods.items():
        if name != "ours":
            got = np.asarray(fn(Xcheck))
            checks[name] = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
    print(f"[threads={threads}] max |logits - float model| / max |float logits|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()), flush=True)

    # accuracy and agreement over the whole test set
    preds = {name: _argmax_all(fn, Xte, np.asarray) for name, fn in methods.items()}
    base = preds["numpy"]
    quality = {name: {"accuracy": float(np.mean(p == yte)),
                      "agreement": float(np.mean(p == base))} for name, p in preds.items()}

    rows = []
    for b in args.cpu_batches:
        X = _rows(Xte, b)
        row = {"threads": threads, "batch": b, "repeated_rows": b > Xte.shape[0]}
        for name, (ms, q25, q75, n) in time_cpu(methods, X, args.min_time,
                                                args.rounds).items():
            row.update({name + "_ms": ms, name + "_q25_ms": q25, name + "_q75_ms": q75,
                        name + "_calls": n})
        rows.append(row)
        print(f"[threads={threads}] batch {b}: " + ", ".join(
            f"{k} {row[k + '_ms']:.4g} ms" for k in methods), flush=True)
    if limiter is not None:
        limiter.restore_original_limits()
    with open(args._result, "w") as f:
        json.dump({"threads": threads, "blas": blas, "rows": rows, "quality": quality,
                   "checks_rel_err": checks, "notes": notes, "data": kind,
                   "n_test": int(Xte.shape[0])}, f)
    return 0


def run_cpu(args, argv):
    """One subprocess per thread count (thread variables set before NumPy loads)."""
    out = []
    for t in args.threads:
        env = dict(os.environ)
        env.update({v: str(t) for v in THREAD_VARS})
        fd, path = tempfile.mkstemp(prefix="bench_e2e_", suffix=".json")
        os.close(fd)
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_worker", str(t),
               "--_result", path]
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            print(f"CPU run at {t} threads failed (exit {rc}); skipped", flush=True)
            continue
        with open(path) as f:
            out.append(json.load(f))
        os.unlink(path)
    return out


# ====================================================================== GPU
def run_gpu(args):
    """Time the GPU methods in this process; returns a dict (or None when no GPU)."""
    try:
        import cupy as cp
        cp.cuda.runtime.getDeviceCount()
        cp.asnumpy(cp.zeros(1))                 # creates the context: fails without a device
    except Exception as exc:                    # no CuPy, no driver, no device
        print(f"GPU: skipped ({type(exc).__name__}: {exc})", flush=True)
        return None
    import numpy as np

    from _baselines import cupy_mlp, numpy_mlp, torch_graph_fp16
    layers, fmodel, conv, kind = _load_models(args)
    _, _, Xte, yte = _load_data(kind, args.seed)
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    print(f"GPU: {name}; data {kind}, {Xte.shape[0]} test rows", flush=True)
    Xte_d = cp.asarray(Xte)
    methods, notes, errors = {}, {}, {}
    from nimbus.nn import Module
    ours, label = _ours(conv, gpu=True)
    try:
        ours(Xte_d[:4])
    except Exception as exc:
        if not isinstance(conv, Module):
            raise
        # a plan compiled from host arrays may want the model on the GPU first
        print(f"ours on CuPy input failed ({type(exc).__name__}: {exc}); compiling the "
              "model moved to the GPU instead", flush=True)
        ours, label = _ours(conv.to("cupy"), gpu=True)
    notes["ours"] = label
    methods["ours"] = lambda X: ours(X)
    methods["ours_nan"] = lambda X: ours(X, check_finite="nan")
    methods["ours_nocheck"] = lambda X: ours(X, check_finite=False)
    methods["cublas_fp32"] = cupy_mlp(layers, np.float32)
    methods["cublas_fp16"] = cupy_mlp(layers, np.float16)

    quality = {}
    base = _argmax_all(numpy_mlp(layers), Xte, np.asarray)     # the float model's classes
    for k, fn in methods.items():
        try:
            p = _argmax_all(fn, Xte_d, cp.asnumpy)
            quality[k] = {"accuracy": float(np.mean(p == yte)),
                          "agreement": float(np.mean(p == base))}
        except Exception as exc:
            errors[k] = f"{type(exc).__name__}: {exc}"

    have_torch = True
    try:
        import torch
        if not torch.cuda.is_available():
            raise ImportError("torch sees no CUDA device")
    except ImportError as exc:
        have_torch = False
        notes["torch_graph_fp16"] = f"skipped: {exc}"
        print(f"torch CUDA graph fp16: skipped ({exc})", flush=True)

    rows = []
    for b in args.gpu_batches:
        X = cp.asarray(_rows(Xte, b))
        row = {"batch": b, "repeated_rows": b > Xte.shape[0]}
        # (name, fn, input, events) of every method at this batch; then the methods take
        # turns over --gpu-rounds rounds (a change in the machine's state falls on all of
        # them alike) and each figure is the median over the rounds
        timed = [(k, fn, X, "cupy") for k, fn in methods.items() if k not in errors]
        if have_torch and "torch_graph_fp16" not in errors:
            try:
                tfn, torch = torch_graph_fp16(layers, b)
                Xt = torch.from_dlpack(X)
                timed.append(("torch_graph_fp16", tfn, Xt, "torch"))
                if b >= Xte.shape[0] and "torch_graph_fp16" not in quality:
                    # the first rows of X are the test set in order
                    p = tfn(Xt).float().cpu().numpy()[:Xte.shape[0]].argmax(axis=1)
                    quality["torch_graph_fp16"] = {"accuracy": float(np.mean(p == yte)),
                                                   "agreement": float(np.mean(p == base))}
            except Exception as exc:
                errors["torch_graph_fp16"] = f"{type(exc).__name__}: {exc}"
                print(f"GPU torch_graph_fp16: skipped ({errors['torch_graph_fp16']})",
                      flush=True)
        got = {k: [] for k, *_ in timed}
        for _ in range(args.gpu_rounds):
            for k, fn, Xk, events in timed:
                if k + "_error" in row:
                    continue
                try:
                    got[k].append(time_gpu(fn, Xk, args.min_time / args.gpu_rounds, events))
                except Exception as exc:         # one failing cell must not end the run
                    row[k + "_error"] = f"{type(exc).__name__}: {exc}"
                    print(f"GPU {k} at batch {b}: skipped ({row[k + '_error']})", flush=True)
        for k, res in got.items():
            if res and k + "_error" not in row:
                row.update({k + "_dev_ms": float(np.median([r[0] for r in res])),
                            k + "_wall_ms": float(np.median([r[1] for r in res])),
                            k + "_calls": int(sum(r[2] for r in res)),
                            k + "_rounds_dev_ms": [r[0] for r in res],
                            k + "_rounds_wall_ms": [r[1] for r in res]})
        del timed
        rows.append(row)
        print(f"GPU batch {b}: " + ", ".join(
            f"{k} {row[k + '_dev_ms']:.4g}/{row[k + '_wall_ms']:.4g} ms"
            for k, _ in GPU_METHODS if k + "_dev_ms" in row), flush=True)
    return {"device": name, "rows": rows, "quality": quality, "notes": notes,
            "errors": errors}


# ====================================================================== report
def _fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 0.1 else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def _fmt_ratio(a, b):
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}x"


def cpu_table(workers):
    """Markdown: one row per (threads, batch), ms of each method, baseline / ours."""
    head = ["threads", "batch"] + [lab + " ms" for _, lab in CPU_METHODS] + \
        [f"{lab} / ours" for k, lab in CPU_METHODS if k != "ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in workers:
        for r in w["rows"]:
            ms = {k: r.get(k + "_ms") for k, _ in CPU_METHODS}
            cells = [str(r["threads"]), str(r["batch"]) + ("*" if r["repeated_rows"] else "")]
            cells += [_fmt_ms(ms[k]) for k, _ in CPU_METHODS]
            cells += [_fmt_ratio(ms[k], ms["ours"]) for k, _ in CPU_METHODS if k != "ours"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gpu_table(gpu, which):
    """Markdown: one row per batch, ``which`` ("dev" or "wall") ms, baseline / ours."""
    keys = [k for k, _ in GPU_METHODS]
    labels = dict(GPU_METHODS)
    head = ["batch"] + [labels[k] + " ms" for k in keys] + \
        [f"{labels[k]} / ours" for k in keys if not k.startswith("ours")] + \
        ["torch graph / ours 'nan'"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in gpu["rows"]:
        ms = {k: r.get(f"{k}_{which}_ms") for k in keys}
        cells = [str(r["batch"]) + ("*" if r["repeated_rows"] else "")]
        cells += [_fmt_ms(ms[k]) for k in keys]
        cells += [_fmt_ratio(ms[k], ms["ours"]) for k in keys if not k.startswith("ours")]
        cells.append(_fmt_ratio(ms["torch_graph_fp16"], ms["ours_nan"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality_table(quality, labels):
    lines = ["| model | test accuracy | argmax = float model's |", "|---|---|---|"]
    for k, lab in labels:
        q = quality.get(k)
        if q is not None:
            lines.append(f"| {lab} | {100 * q['accuracy']:.2f}% | {100 * q['agreement']:.2f}% |")
    return "\n".join(lines)


def machine_info():
    """CPU model, cores usable by this process, OS and Python (GPU name added by run_gpu)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu_model": cpu, "cores": _cores(), "platform": platform.platform(),
            "python": platform.python_version(), "packages": _versions(),
            "nimbus_commit": _git_commit()}


def _versions():
    """Installed versions of the packages in play (None when absent), without importing them."""
    from importlib import metadata
    out = {}
    for name in ("cumulonimbus", "numpy", "numba", "onnx", "onnxruntime", "threadpoolctl",
                 "cupy-cuda12x", "cupy-cuda13x", "cupy", "torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit():
    """HEAD of the repository this script lives in, "+dirty" if the tree has changes."""
    try:
        root = os.path.join(HERE, "..")
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
        return (head + ("+dirty" if dirty.strip() else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def _loadavg():
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _int_list(text):
    try:
        vals = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,16,256; got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return vals


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--float", metavar="FLOAT.npz", help="the trained float model (nimbus.save)")
    p.add_argument("--converted", metavar="CONV.npz",
                   help="the converted model (int8, folded), or a saved compiled model")
    p.add_argument("--make", metavar="DIR",
                   help="train the float MLP, convert a copy, save both into DIR, benchmark them")
    p.add_argument("--quick", action="store_true",
                   help="with --make: sklearn digits and a 64-64-32-10 MLP (minutes on a CPU)")
    p.add_argument("--seed", type=int, default=0,
                   help="random_state of --make, and the digits train/test split (default 0)")
    p.add_argument("--data", choices=["auto", "digits", "fashion"], default="auto",
                   help="test data (default: from the model's input width)")
    p.add_argument("--gpu", action="store_true", help="also time the GPU (CuPy)")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU measurements")
    p.add_argument("--threads", type=_int_list, default=None,
                   help="CPU thread counts (default: 1 and all cores)")
    p.add_argument("--cpu-batches", type=_int_list, default=list(CPU_BATCHES))
    p.add_argument("--gpu-batches", type=_int_list, default=list(GPU_BATCHES))
    p.add_argument("--min-time", type=float, default=0.2,
                   help="seconds of timed calls per cell, at least (default 0.2)")
    p.add_argument("--rounds", type=int, default=5,
                   help="CPU: rounds in which the methods' timed calls take turns (default 5)")
    p.add_argument("--gpu-rounds", type=int, default=3,
                   help="GPU: rounds in which the methods take turns; each figure is the "
                        "median over the rounds (default 3)")
    p.add_argument("--json", metavar="OUT.json", help="write every figure here")
    p.add_argument("--_worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.min_time <= 0:
        p.error("--min-time must be > 0")
    if args.gpu_rounds < 1:
        p.error("--gpu-rounds must be >= 1")
    if args._worker is None:
        if args.make and (args.float or args.converted):
            p.error("give either --make DIR or --float and --converted, not both")
        if not args.make and not (args.float and args.converted):
            p.error("give --float FLOAT.npz and --converted CONV.npz, or --make DIR")
        if args.quick and not args.make:
            p.error("--quick only applies to --make (the data set follows the model)")
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args._worker is not None:
        return cpu_worker(args)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.make:
        args.float, args.converted = make_models(args.make, args.quick, args.seed)
    for path in (args.float, args.converted):
        if not os.path.isfile(path):
            raise SystemExit(f"error: no such model file: {path}")
    try:
        _load_models(args)                  # a wrong file fails here, not in every worker
    except (ValueError, TypeError, KeyError) as exc:
        raise SystemExit(f"error: {exc}")
    # the workers get the model paths, never --make: they must not train again
    wargv = ["--float", args.float, "--converted", args.converted, "--seed", str(args.seed),
             "--data", args.data, "--cpu-batches", ",".join(map(str, args.cpu_batches)),
             "--min-time", str(args.min_time)]
    machine = machine_info()
    args.threads = args.threads or sorted({1, machine["cores"]})
    result = {"date": started, "command": command, "machine": machine,
              "models": {"float": os.path.abspath(args.float),
                         "float_bytes": os.path.getsize(args.float),
                         "float32_weight_bytes": _weight_bytes(args.float),
                         "converted": os.path.abspath(args.converted),
                         "converted_bytes": os.path.getsize(args.converted)},
              "cpu": None, "gpu": None}
    out = []
    if not args.no_cpu:
        load0 = _loadavg()
        workers = run_cpu(args, wargv)
        load1 = _loadavg()
        result["cpu"] = workers
        result["cpu_load_average_1min"] = [load0, load1]
        busy = [v for v in (load0, load1) if v is not None and v > 0.5 * machine["cores"]]
        load_note = None
        if busy and workers:
            # other processes on the cores: a thread that loses its core stalls a
            # multi-threaded BLAS/ORT call for a scheduler slice (ms), which the medians show
            load_note = (f"note: the 1-minute load average was {load0:.1f} before and "
                       f"{load1:.1f} after the CPU runs on {machine['cores']} cores: other "
                       "work shared the cores, the figures (above all those at more than "
                       "1 thread) are rough")
        if workers:
            w0 = workers[0]
            out.append(f"### CPU: {machine['cpu_model']}, {machine['cores']} cores; data "
                       f"{w0['data']}; ours = {w0['notes'].get('ours')}\n\n"
                       "ms per call (median); ratio = baseline ms / ours ms (> 1: ours "
                       "faster); * = test rows repeated to fill the batch\n\n"
                       + cpu_table(workers) + "\n\n" + quality_table(w0["quality"], CPU_METHODS))
            for note in w0["notes"].values():
                if note.startswith("skipped"):
                    out.append(note)
            if load_note:
                out.append(load_note)
    if args.gpu:
        gpu = run_gpu(args)
        result["gpu"] = gpu
        if gpu is not None:
            machine["gpu"] = gpu["device"]
            hdr = (f"### GPU: {gpu['device']}; ours = {gpu['notes'].get('ours')}\n\n"
                   "ratio = baseline ms / ours ms (ours = check_finite=True, the default); "
                   "* = test rows repeated\n\n")
            out.append(hdr + "Device time (CUDA events, median per call):\n\n"
                       + gpu_table(gpu, "dev") + "\n\nHost wall time per call (loop, one "
                       "sync at the end):\n\n" + gpu_table(gpu, "wall") + "\n\n"
                       + quality_table(gpu["quality"], GPU_METHODS))
            for k, why in list(gpu["notes"].items()) + list(gpu["errors"].items()):
                if k != "ours":
                    out.append(f"{k}: {why}")
    text = "\n\n".join(out)
    print("\n" + text if text else "nothing measured")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
