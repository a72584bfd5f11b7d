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
