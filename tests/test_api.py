"""nimbus.amm / fit / compare and the command line."""
import subprocess
import sys

import numpy as np
import pytest

import nimbus
from nimbus.arrays import backend


def test_amm_close_to_product(xp, rng):
    r = 4
    A = rng.standard_normal((3000, r)) @ rng.standard_normal((r, 32)) + 0.1 * rng.standard_normal((3000, 32))
    A = xp.asarray(A.astype(np.float32))
    B = xp.asarray(rng.standard_normal((32, 8)).astype(np.float32))
    Y = nimbus.amm(A, B, ncodebooks=8)
    assert type(Y) is type(A) and Y.dtype == np.float32 and Y.shape == (3000, 8)
    assert nimbus.nmse(A @ B, Y) < 0.1


def test_amm_with_separate_train(rng):
    A_tr = rng.standard_normal((2000, 16)).astype(np.float32)
    A = rng.standard_normal((7, 16)).astype(np.float32)
    B = rng.standard_normal((16, 3)).astype(np.float32)
    Y = nimbus.amm(A, B, train=A_tr, ncodebooks=4)
    assert Y.shape == (7, 3)
    op = nimbus.fit(A_tr, B, ncodebooks=4)
    np.testing.assert_array_equal(Y, op(A))


@pytest.mark.gpu
def test_mixed_libraries_follow_A(rng):
    cp = backend.cupy()
    A = rng.standard_normal((500, 16)).astype(np.float32)
    B = rng.standard_normal((16, 3)).astype(np.float32)
    op = nimbus.fit(A, B, ncodebooks=4)                  # fitted on the host
    Yg = op(cp.asarray(A))                               # applied on the GPU
    assert backend.is_cupy(Yg)
    np.testing.assert_allclose(Yg.get(), op(A), rtol=1e-5, atol=1e-5)
    Y2 = nimbus.amm(cp.asarray(A), B, ncodebooks=4)      # B converted on purpose
    assert backend.is_cupy(Y2)


def test_compare_table(rng):
    A_tr, A_te, B = nimbus.nn.data.digits_task()
    t = nimbus.compare(A_tr, A_te, B, methods=["exact", "pq", "maddness"], ncodebooks=[4, 8],
                       random_state=0, repeat=1)
    assert [(r["method"], r["C"]) for r in t] == [("exact", None), ("pq", 4), ("pq", 8),
                                                  ("maddness", 4), ("maddness", 8)]
    assert t[0]["nmse"] == pytest.approx(0, abs=1e-6)
    for r in list(t)[1:]:
        assert 0 < r["nmse"] < 1 and r["fit_s"] > 0 and r["apply_s"] > 0
    assert t.where(method="pq", C=8)[0]["lut_bytes"] == 8 * 16 * 20
    assert "maddness" in str(t) and "<table>" in t._repr_html_()
    with pytest.raises(ValueError, match="unknown method"):
        nimbus.compare(A_tr, A_te, B, methods=["nope"])
    with pytest.raises(ValueError, match="no method takes"):
        nimbus.compare(A_tr, A_te, B, methods=["pq"], split="node")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nimbus", *args], capture_output=True,
                          text=True, cwd=cwd, env={**__import__("os").environ, "MPLBACKEND": "Agg"})


def test_cli_compare_default_and_npy(tmp_path, rng):
    r = _cli("compare", "--ncodebooks", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "sklearn digits" in r.stdout and "maddness" in r.stdout and "pq" in r.stdout
    A = rng.standard_normal((300, 12)).astype(np.float32)
    B = rng.standard_normal((12, 3)).astype(np.float32)
    for name, arr in (("tr", A[:200]), ("te", A[200:]), ("B", B)):
        np.save(tmp_path / f"{name}.npy", arr)
    r = _cli("compare", str(tmp_path / "tr.npy"), str(tmp_path / "te.npy"), str(tmp_path / "B.npy"),
             "--ncodebooks", "2,3", "--method", "maddness", "--quiet", "--plot", str(tmp_path / "p.png"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("maddness") >= 2 and (tmp_path / "p.png").exists()


def test_cli_errors(tmp_path):
    r = _cli("compare", "a.npy", "--quiet")
    assert r.returncode != 0 and "three .npy files" in r.stderr
    r = _cli("compare", "x.npy", "y.npy", "z.npy")
    assert r.returncode != 0 and "not found" in r.stderr
    r = _cli("compare", "--ncodebooks", "0")
    assert r.returncode != 0 and "positive" in r.stderr
    r = _cli("compare", "--method", "bogus", "--quiet")
    assert r.returncode != 0 and "unknown method" in r.stderr


def test_cli_convert_depth_and_lut_form():
    r = _cli("convert", "--quick", "--quiet", "--epochs", "3", "--epochs-per-layer", "1",
             "--finetune-epochs", "1", "--depth", "5", "--lut-form", "factored")
    assert r.returncode == 0, r.stderr
    assert "depth 5 (32 LUT rows per codebook), factored" in r.stdout
    assert "folded" in r.stdout and "converted" in r.stdout
    r = _cli("convert", "--quick", "--quiet", "--depth", "11")
    assert r.returncode != 0 and "depth" in r.stderr


@pytest.mark.parametrize("method", ["maddness", "pq", "joint", "exact"])
def test_check_finite_switch(xp, rng, method):
    A = xp.asarray(rng.standard_normal((400, 16)).astype(np.float32))
    B = xp.asarray(rng.standard_normal((16, 4)).astype(np.float32))
    op = nimbus.fit(A, B, method=method, ncodebooks=4)
    # finite input: the same result either way
    np.testing.assert_array_equal(backend.to_host(op(A, check_finite=False)),
                                  backend.to_host(op(A)))
    np.testing.assert_array_equal(backend.to_host(op.encode(A, check_finite=False)),
                                  backend.to_host(op.encode(A)))
    bad = A.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite|NaN"):
        op(bad)
    with pytest.raises(TypeError, match="check_finite"):
        op(A, check_finite="no")
    if backend.is_cupy(A) or method == "exact":
        Y = op(bad, check_finite=False)   # the caller promised finite rows: no check, no sync
        assert Y.shape == (400, 4)
    else:                                 # the CPU encoders check in their one pass over A
        with pytest.raises(ValueError, match="non-finite|NaN"):
            op(bad, check_finite=False)
    from nimbus.arrays import kernels
    assert kernels.finite_checks_enabled()          # the switch does not leak
