"""The kernel op table (nimbus.arrays.kernels.OP_TABLE) and the CUDA sources it points to.

Every entry must name implementations that exist and tests that exist, so that an op
cannot be added (or a test renamed) without the table following. The CUDA C lives in
nimbus/arrays/kernels/cuda/*.cu: every kernel there must belong to a source family, have
a thread-mapping comment, and come out of ``cuda.source`` with its placeholders filled.
These checks need no GPU.
"""
import ast
import os
import re

import numpy as np
import pytest

from nimbus.arrays import kernels
from nimbus.arrays.kernels import cuda, dm_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_DIR = os.path.join(os.path.dirname(cuda.__file__), "cuda")


def _test_functions(path):
    """Names of the module-level functions of a test file."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("op", sorted(kernels.OP_TABLE))
def test_every_entry_resolves_and_names_existing_tests(op):
    entry = kernels.OP_TABLE[op]
    assert entry.reference, op                       # every op has an oracle
    for column in ("reference", "cpu", "cuda", "cuda_wide"):
        name = getattr(entry, column)
        if name is not None:
            fn = kernels.resolve(name)
            assert callable(fn), f"{op}.{column} = {name} is not a function"
    assert entry.cpu or entry.cuda, op               # something beyond the oracle
    assert entry.tests, f"{op} names no test"
    for test in entry.tests:
        path, sep, name = test.partition("::")
        assert sep and path.startswith("tests/"), test
        assert os.path.exists(os.path.join(ROOT, path)), f"{op}: no file {path}"
        assert name in _test_functions(path), f"{op}: no test {name} in {path}"


def test_dispatched_ops_are_in_the_table_and_dispatch_to_it():
    assert set(kernels.OPS) <= set(kernels.OP_TABLE)
    A = np.zeros((2, 3), np.float32)
    for op in kernels.OPS:
        entry = kernels.OP_TABLE[op]
        # the table's names are the functions the dispatch picks
        assert entry.reference == f"reference.{op}"
        assert kernels.implementation(op, A) is kernels.resolve(entry.cpu)
        assert entry.cuda == f"cuda.{op}"
        if entry.cuda_wide is not None:
            assert kernels._wide_gpu(op, 512) is kernels.resolve(entry.cuda_wide)
        else:
            assert kernels._wide_gpu(op, 512) is kernels.resolve(entry.reference)


def test_resolve_names_the_missing_function():
    with pytest.raises(AttributeError):
        kernels.resolve("reference.no_such_op")
    with pytest.raises(ImportError):
        kernels.resolve("no_such_module.encode_tree")


def _imports(path):
    """Every module name a file imports (``from X import a`` gives X and X.a)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("path", ["nimbus/arrays/validate.py", "nimbus/arrays/backend.py",
                                  "nimbus/arrays/kernels/cpu.py", "nimbus/arrays/kernels/dm_cpu.py",
                                  "nimbus/arrays/kernels/dm_cuda.py"])
def test_production_modules_do_not_import_the_oracle(path):
    # the shape rules the kernels share live in validate; the oracles (reference,
    # dm_reference) are for tests and the dispatch's fallback (kernels/__init__.py, and
    # the two fallbacks of cuda.py's launchers)
    bad = {m for m in _imports(path) if m.rsplit(".", 1)[-1].endswith("reference")}
    assert not bad, f"{path} imports {sorted(bad)}"


def test_reference_reexports_the_shape_rules():
    from nimbus.arrays import validate
    from nimbus.arrays.kernels import reference
    from nimbus.arrays.kernels import dm_reference
    for name in ("MAX_DEPTH", "BYTE_DEPTH", "code_dtype", "tree_depth", "depth_of_nodes",
                 "check_tree", "lut_buckets", "check_nbuckets"):
        assert getattr(reference, name) is getattr(validate, name)
    assert dm_reference.check_dm is validate.check_dm
    assert validate.code_dtype(256) == np.uint8 and validate.code_dtype(257) == np.uint16


# ------------------------------------------------------------------ CUDA sources
def _kernels_in(text):
    return re.findall(r'extern "C" __global__ void(?:\s+__launch_bounds__\([^)]*\))?'
                      r'(?:\s*//[^\n]*)?\s+(\w+)', text)


def test_every_cuda_kernel_belongs_to_a_family_and_has_a_thread_mapping():
    files = sorted(f for f in os.listdir(CUDA_DIR) if f.endswith((".cu", ".cuh")))
    assert "prelude.cuh" in files and "dm.cu" in files
    used = {f for fam in cuda._FAMILIES.values() for f in fam} | {"prelude.cuh", "dm.cu"}
    ours = [f for f in files if not f.startswith("runtime")]    # runtime*.cu: the runtime's
    assert set(ours) <= used, f"files no source uses: {sorted(set(ours) - used)}"
    assert used <= set(files), f"missing: {sorted(used - set(files))}"
    for f in ours:
        text = cuda.load_source(f)
        lines = text.split("\n")
        for name in _kernels_in(text):
            if f != "dm.cu":
                assert name in cuda._FAMILIES, f"{f}: kernel {name} has no family"
            at = next(i for i, line in enumerate(lines) if re.search(rf"\b{name}\s*\(", line)
                      or line.strip() == name + "(")
            before = "\n".join(lines[max(0, at - 14):at + 1])
            assert "Thread mapping" in before, f"{f}: {name} has no thread-mapping comment"


@pytest.mark.parametrize("name", sorted(cuda._FAMILIES))
def test_sources_are_complete(name):
    src = cuda.source(name, OUT=np.float16, NCB=16, MT=256, RPT=4, NSTAGE=2, UNROLL_C=4)
    assert name in _kernels_in(src)
    assert "PRAGMA_UNROLL_C" not in src
    assert src.startswith("#define IN_T float\n")
    assert "#define OUT_T u16" in src and "#define NCB 16" in src
    assert cuda.load_source("prelude.cuh") in src
    if "lookup_q_core.cuh" in cuda._FAMILIES[name]:
        assert "#pragma unroll 4\n    for (int c = cb; c < ce; c += 4)" in src


def test_dm_source_per_depth():
    for depth in (1, 4, 9, 10):
        src = dm_cuda._module_source(depth)
        assert src.startswith(f"#define DEPTH {depth}\n")
        assert {"dm_encode", "dm_lookup_q4", "dm_onehot"} <= set(_kernels_in(src))


def test_missing_source_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no_such.cu"):
        cuda.load_source("no_such.cu")
    with pytest.raises(KeyError):
        cuda.source("no_such_kernel")
