"""save/load: identical outputs after a round trip; clear errors for bad files."""
import os
import zipfile

import numpy as np
import pytest

import nimbus


@pytest.fixture
def task(rng):
    A = rng.standard_normal((400, 20)).astype(np.float32)
    B = rng.standard_normal((20, 6)).astype(np.float32)
    return A, B


@pytest.mark.parametrize("method,kw", [("exact", {}), ("pq", {"random_state": 0}),
                                        ("maddness", {}), ("maddness", {"split": "node",
                                                                         "quantize": False})])
def test_round_trip_identical(tmp_path, task, method, kw):
    A, B = task
    op = nimbus.fit(A, B, method=method, ncodebooks=4, **kw)
    path = tmp_path / "op.npz"
    nimbus.save(op, path)
    op2 = nimbus.load(path)
    assert type(op2) is type(op) and op2.get_params() == op.get_params()
    np.testing.assert_array_equal(op(A), op2(A))


def test_saved_file_has_no_pickles(tmp_path, task):
    A, B = task
    path = tmp_path / "op.npz"
    nimbus.save(nimbus.fit(A, B, ncodebooks=4), path)
    with np.load(path, allow_pickle=False) as z:     # would raise on object arrays
        assert "__nimbus__" in z.files and all(z[k].dtype != object for k in z.files)


def test_random_state_object_param_saved_as_none(tmp_path, task):
    A, B = task
    op = nimbus.fit(A, B, method="pq", ncodebooks=4, random_state=np.random.RandomState(0))
    nimbus.save(op, tmp_path / "x.npz")
    assert nimbus.load(tmp_path / "x.npz").random_state is None


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        nimbus.load(tmp_path / "nope.npz")


def test_corrupt_file(tmp_path, task):
    A, B = task
    path = tmp_path / "op.npz"
    nimbus.save(nimbus.fit(A, B, ncodebooks=4), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])              # truncated
    with pytest.raises(ValueError, match="not a readable nimbus file|corrupt|malformed"):
        nimbus.load(path)
    path.write_bytes(b"this is not a zip file at all")
    with pytest.raises(ValueError, match="not a readable nimbus file"):
        nimbus.load(path)


def test_foreign_npz(tmp_path):
    path = tmp_path / "foreign.npz"
    np.savez(path, a=np.arange(3))
    with pytest.raises(ValueError, match="not written by nimbus.save"):
        nimbus.load(path)
    np.save(tmp_path / "single.npy", np.arange(3))
    with pytest.raises(ValueError, match="single array"):
        nimbus.load(tmp_path / "single.npy")


def test_tampered_metadata(tmp_path, task):
    A, B = task
    path = tmp_path / "op.npz"
    nimbus.save(nimbus.fit(A, B, ncodebooks=4), path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for meta, match in [('{"format": "nimbus", "version": 99, "kind": "strategy"}', "newer"),
                        ('{"format": "other"}', "not a nimbus file"),
                        ("{not json", "corrupt"),
                        ('{"format": "nimbus", "version": 1, "kind": "spaceship"}', "unknown")]:
        arrays["__nimbus__"] = np.array(meta)
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=match):
            nimbus.load(path)
    # an array missing from the archive
    good = tmp_path / "good.npz"
    nimbus.save(nimbus.fit(A, B, ncodebooks=4), good)
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files if k != "lut_q_"}
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="malformed"):
        nimbus.load(path)


def test_failed_save_keeps_old_file(tmp_path, task, monkeypatch):
    A, B = task
    path = tmp_path / "op.npz"
    nimbus.save(nimbus.fit(A, B, ncodebooks=4), path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        nimbus.save(nimbus.fit(A, B, ncodebooks=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["op.npz"]     # no temp file left


def test_save_refuses_non_nimbus(tmp_path):
    with pytest.raises(TypeError, match="cannot save"):
        nimbus.save({"a": 1}, tmp_path / "x.npz")
    assert not os.path.exists(tmp_path / "x.npz")


def test_load_is_zip_with_meta(tmp_path, task):
    A, B = task
    path = tmp_path / "op.npz"
    nimbus.save(nimbus.fit(A, B, ncodebooks=4), path)
    assert zipfile.is_zipfile(path)


def test_io_imports_nothing_of_nimbus():
    # The save registry must not import the packages that register into it
    # (that made a cycle of seven files); those register themselves instead.
    import ast
    import nimbus.io
    tree = ast.parse(open(nimbus.io.__file__).read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("nimbus")):
            found.append(ast.unparse(node))
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("nimbus")]
    assert found == []


class _Toy:
    """A class outside nimbus that takes part in save/load through the registry."""
    _nimbus_kind = "toy-kind-for-test"

    def __init__(self, w):
        self.w = w                     # (n,) float32

    def to_state(self):
        return {"n": int(self.w.shape[0])}, {"w": self.w}


def test_a_kind_registered_elsewhere_round_trips(tmp_path):
    import nimbus.io
    nimbus.io.register_loader(_Toy._nimbus_kind, lambda meta, arrays: _Toy(arrays["w"][: meta["n"]]))
    try:
        assert _Toy._nimbus_kind in nimbus.io.known_kinds()
        w = np.arange(5, dtype=np.float32)
        back = nimbus.load(nimbus.save(_Toy(w), tmp_path / "toy.npz"))
        assert isinstance(back, _Toy)
        np.testing.assert_array_equal(back.w, w)
        # a loader that finds an array missing gets the file's clear error
        nimbus.io.register_loader(_Toy._nimbus_kind, lambda meta, arrays: _Toy(arrays["v"]))
        with pytest.raises(ValueError, match="malformed"):
            nimbus.load(tmp_path / "toy.npz")
    finally:
        nimbus.io._loaders.pop(_Toy._nimbus_kind, None)
    with pytest.raises(ValueError, match="unknown object kind 'toy-kind-for-test'"):
        nimbus.load(tmp_path / "toy.npz")


def test_register_loader_checks_its_arguments():
    import nimbus.io
    with pytest.raises(TypeError, match="non-empty str"):
        nimbus.io.register_loader("", lambda m, a: None)
    with pytest.raises(TypeError, match="callable"):
        nimbus.io.register_loader("x", 3)


def test_non_string_kind_is_unknown(tmp_path, task):
    A, B = task
    path = tmp_path / "op.npz"
    nimbus.save(nimbus.fit(A, B, ncodebooks=4), path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["__nimbus__"] = np.array('{"format": "nimbus", "version": 1, "kind": ["strategy"]}')
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="unknown object kind"):
        nimbus.load(path)


def test_public_load_imports_the_registering_packages(tmp_path):
    # In a fresh interpreter nimbus.nn is not imported by `import nimbus`:
    # nimbus.io.load alone does not know models (it imports nothing), while
    # nimbus.load imports nimbus.nn, whose import registers the "model" kind.
    import subprocess
    import sys
    nn = pytest.importorskip("nimbus.nn")
    path = tmp_path / "m.npz"
    model = nn.Sequential(nn.Linear(3, 2))
    nimbus.save(model, path)
    code = (
        "import sys, nimbus, nimbus.io\n"
        "assert 'nimbus.nn' not in sys.modules\n"
        f"p = {str(path)!r}\n"
        "try:\n"
        "    nimbus.io.load(p)\n"
        "    raise SystemExit('io.load read a model without nimbus.nn')\n"
        "except ValueError as e:\n"
        "    assert \"unknown object kind 'model'\" in str(e) and 'nimbus.load' in str(e), e\n"
        "m = nimbus.load(p)\n"
        "assert type(m).__name__ == 'Sequential' and 'nimbus.nn' in sys.modules\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr + out.stdout
