"""Bad inputs give clear errors naming the problem; real numbers are coerced as documented."""
import numpy as np
import pytest

import nimbus
from nimbus.arrays import validate


def _fitted(xp, rng, C=4, D=12, M=3):
    A = xp.asarray(rng.standard_normal((200, D)).astype(np.float32))
    B = xp.asarray(rng.standard_normal((D, M)).astype(np.float32))
    return nimbus.fit(A, B, ncodebooks=C), A, B


@pytest.mark.parametrize("bad,match", [
    (np.nan, "non-finite"), (np.inf, "non-finite"), (-np.inf, "non-finite"),
])
def test_nan_inf_rejected(xp, rng, bad, match):
    op, A, B = _fitted(xp, rng)
    A2 = A.copy()
    A2[3, 5] = bad
    with pytest.raises(ValueError, match=match) as e:
        op(A2)
    assert "(3, 5)" in str(e.value)
    with pytest.raises(ValueError, match=match):
        nimbus.fit(A2, B, ncodebooks=4)
    B2 = B.copy()
    B2[0, 0] = bad
    with pytest.raises(ValueError, match="B contains"):
        nimbus.fit(A, B2, ncodebooks=4)


def test_float64_overflowing_float32_rejected(rng):
    A = rng.standard_normal((50, 4))
    A[0, 0] = 1e300
    with pytest.raises(ValueError, match="too large for float32"):
        validate.as_matrix(A)


def test_bool_complex_object_rejected(rng):
    A = rng.standard_normal((50, 8))
    with pytest.raises(TypeError, match="bool"):
        nimbus.fit(A > 0, rng.standard_normal((8, 2)), ncodebooks=2)
    with pytest.raises(TypeError, match="complex"):
        nimbus.fit(A.astype(np.complex64), rng.standard_normal((8, 2)), ncodebooks=2)
    with pytest.raises(TypeError, match="dtype"):
        nimbus.fit(A.astype(object), rng.standard_normal((8, 2)), ncodebooks=2)
    with pytest.raises(TypeError, match="2-D array"):
        nimbus.fit("abc", rng.standard_normal((8, 2)))
    with pytest.raises(TypeError):
        nimbus.fit(None, rng.standard_normal((8, 2)))


def test_ints_and_float64_coerced(rng):
    # documented coercion: integer pixels and float64 become float32, results identical
    A = rng.integers(0, 17, size=(300, 16))
    B = rng.standard_normal((16, 4))
    op64 = nimbus.fit(A, B, ncodebooks=4)
    op32 = nimbus.fit(A.astype(np.float32), B.astype(np.float32), ncodebooks=4)
    Y64, Y32 = op64(A.astype(np.uint8)), op32(A.astype(np.float32))
    assert Y64.dtype == np.float32
    np.testing.assert_array_equal(Y64, Y32)


def test_noncontiguous_coerced(xp, rng):
    op, A, B = _fitted(xp, rng)
    wide = xp.asarray(rng.standard_normal((A.shape[0], 2 * A.shape[1])).astype(np.float32))
    wide[:, ::2] = A
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(nimbus.arrays.backend.to_host(op(strided)),
                                  nimbus.arrays.backend.to_host(op(A)))
    Af = xp.asfortranarray(A)
    np.testing.assert_array_equal(nimbus.arrays.backend.to_host(op(Af)),
                                  nimbus.arrays.backend.to_host(op(A)))


@pytest.mark.parametrize("shape", [(12,), (2, 3, 12), ()])
def test_wrong_ndim(rng, shape):
    op, A, B = _fitted(np, rng)
    with pytest.raises(ValueError, match="must be 2-D"):
        op(np.zeros(shape, dtype=np.float32) if shape else np.float32(1))


def test_mismatched_D(rng):
    op, A, B = _fitted(np, rng)
    with pytest.raises(ValueError, match="13 columns but the strategy was fitted on 12"):
        op(rng.standard_normal((5, 13)))
    with pytest.raises(ValueError, match="inner dimensions differ"):
        nimbus.fit(A, rng.standard_normal((11, 3)), ncodebooks=4)
    with pytest.raises(ValueError, match="B has 11 rows"):
        op.build_lut(rng.standard_normal((11, 3)))


def test_empty(rng):
    op, A, B = _fitted(np, rng)
    with pytest.raises(ValueError, match="empty"):
        op(np.zeros((0, 12), dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        nimbus.fit(np.zeros((0, 12)), B)
    with pytest.raises(ValueError, match="empty"):
        nimbus.fit(A, np.zeros((12, 0)))


@pytest.mark.parametrize("method", ["pq", "maddness"])
def test_too_few_rows_to_fit(rng, method):
    with pytest.raises(ValueError, match="at least 16 are needed"):
        nimbus.fit(rng.standard_normal((15, 8)), rng.standard_normal((8, 2)), method=method,
                   ncodebooks=2)


def test_codes_checked(xp, rng):
    op, A, B = _fitted(xp, rng)
    codes = op.encode(A)
    bad = codes.copy()
    bad[0, 0] = 16
    with pytest.raises(ValueError, match="bucket 16"):
        op.lookup(bad)
    with pytest.raises(TypeError, match="uint8"):
        op.lookup(codes.astype(np.int32))
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        op.lookup(codes[:, :3])


@pytest.mark.parametrize("method", ["pq", "maddness"])
def test_C_larger_than_D(rng, method):
    with pytest.raises(ValueError, match="ncodebooks=9 is larger than the number of columns D=8"):
        nimbus.fit(rng.standard_normal((100, 8)), rng.standard_normal((8, 2)), method=method,
                   ncodebooks=9)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_bad_ncodebooks(rng, bad):
    with pytest.raises((ValueError, TypeError), match="ncodebooks"):
        nimbus.fit(rng.standard_normal((100, 8)), rng.standard_normal((8, 2)), ncodebooks=bad)


def test_bad_hyperparameters(rng):
    A, B = rng.standard_normal((100, 8)), rng.standard_normal((8, 2))
    with pytest.raises(ValueError, match="split must be one of"):
        nimbus.fit(A, B, split="leaf")
    with pytest.raises(ValueError, match="ridge must be at least 0"):
        nimbus.fit(A, B, ridge=-1.0)
    with pytest.raises(ValueError, match="unknown method"):
        nimbus.fit(A, B, method="magic")
    with pytest.raises(ValueError, match="no parameter"):
        nimbus.fit(A, B, method="pq", split="node")
    with pytest.raises(TypeError, match="random_state"):
        nimbus.fit(A, B, method="pq", random_state="seed")


def test_use_before_fit(rng):
    op = nimbus.strategies.Maddness(4)
    with pytest.raises(ValueError, match="not fitted"):
        op(rng.standard_normal((3, 8)))
    op.fit(rng.standard_normal((100, 8)))          # no B: hash learned, no LUT yet
    assert op.encode(rng.standard_normal((3, 8))).shape == (3, 4)
    with pytest.raises(ValueError, match="build_lut"):
        op(rng.standard_normal((3, 8)))
