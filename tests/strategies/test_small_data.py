"""Few training rows (issue 17): the rules MADDNESS and joint take from N below
``_lut.SMALL_ROWS`` rows (leaf size, ridge penalty, clip), joint's check against MADDNESS,
the fallback, the error for too few rows, and that none of it fires from SMALL_ROWS on."""
import numpy as np
import pytest

import nimbus
from nimbus.strategies import Joint, Maddness
from nimbus.strategies.joint import SELECT_MARGIN, SELECT_Z
from nimbus.strategies._lut import (LOO_GRID, SMALL_ROWS, CodeRidge, onehot, ridge_loo,
                                    ridge_reg, small_data_clip)
from nimbus.strategies._trees import small_data_min_leaf


def _lowrank(rng, n, D=64, M=12, r=4):
    """(A (n, D), B (D, M)) float32: rank-r rows plus 0.1 noise, Gaussian B."""
    A = rng.standard_normal((n, r)) @ rng.standard_normal((r, D))
    A = (A + 0.1 * rng.standard_normal((n, D))).astype(np.float32)
    return A, rng.standard_normal((D, M)).astype(np.float32)


def _heavy(rng, n, D=32, M=8):
    """(A (n, D), B (D, M)) float32: Student-t rows (2.5 degrees of freedom), columns
    scaled over a 30x range."""
    scale = np.exp(rng.uniform(0, np.log(30), D))
    A = (rng.standard_t(2.5, size=(n, D)) * scale).astype(np.float32)
    return A, rng.standard_normal((D, M)).astype(np.float32)


# ------------------------------------------------------------------ leaf size from N
@pytest.mark.parametrize("N, K, width, expected", [
    (16, 16, 4, 2), (100, 16, 4, 2), (191, 16, 4, 2), (192, 16, 4, 3), (300, 16, 8, 4),
    (511, 16, 4, 7), (512, 16, 4, 8), (1000, 16, 4, 8), (300, 4, 4, 8), (300, 256, 4, 2),
    (100, 16, 3, 1), (128, 16, 1, 2), (600, 16, 2, 8)])
def test_small_data_min_leaf_rule(N, K, width, expected):
    assert small_data_min_leaf(N, K, width) == expected


def test_maddness_leaves_keep_the_rule_s_rows(rng):
    A, B = _lowrank(rng, 300)
    op = nimbus.fit(A, B, "maddness", 8)
    assert op.min_leaf_ == 4                         # 300 // 64, 8 columns a subspace
    codes = op.encode(A)
    for c in range(8):
        counts = np.bincount(codes[:, c], minlength=16)
        assert counts[counts > 0].min() >= 4, (c, counts)
    # the rule is what does it: leaves of one to three rows come back with min_leaf=1
    op1 = nimbus.fit(A, B, "maddness", 8, min_leaf=1)
    assert op1.min_leaf_ == 1
    codes1 = op1.encode(A)
    smallest = min(np.bincount(codes1[:, c], minlength=16)[
        np.bincount(codes1[:, c], minlength=16) > 0].min() for c in range(8))
    assert smallest < 4


def test_joint_leaf_rule_from_N(rng):
    A, B = _lowrank(rng, 300)
    op = nimbus.fit(A, B, "joint", 8, select=False)
    assert op.min_leaf_ == small_data_min_leaf(300, 16, 8) == 4
    codes = op.encode(A)
    for c in range(8):
        counts = np.bincount(codes[:, c], minlength=16)
        assert counts[counts > 0].min() >= 4, (c, counts)


# ---------------------------------------------------------------- ridge from N
def test_ridge_loo_is_the_leave_one_out_error():
    # the closed form against refits with each row left out, for both the (N, N) and
    # the (C K, C K) eigendecomposition
    rng = np.random.default_rng(1)
    for N, C, K in ((30, 3, 16), (60, 2, 4)):
        codes = rng.integers(0, K, (N, C)).astype(np.uint8)
        R = rng.standard_normal((N, 3))
        grid = (0.0, 0.3, 3.0, float("inf"))
        errors = ridge_loo(codes, R, K, grid)
        G = onehot(codes, K, np.float64)
        for lam, err in zip(grid, errors):
            if not np.isfinite(lam):
                assert err == pytest.approx((R ** 2).sum())
                continue
            reg = ridge_reg(lam, N, C, K)
            brute = 0.0
            for n in range(N):
                keep = np.arange(N) != n
                Gk = G[keep]
                D = np.linalg.solve(Gk.T @ Gk + reg * np.eye(C * K), Gk.T @ R[keep])
                brute += ((R[n] - G[n] @ D) ** 2).sum()
            assert err == pytest.approx(brute, rel=1e-6)


def test_maddness_ridge_by_leave_one_out_with_few_rows_fixed_with_many(rng):
    A, B = _lowrank(rng, 200)
    op = nimbus.fit(A, B, "maddness", 8)
    assert op.ridge_chosen_ in LOO_GRID
    A2, B2 = _lowrank(rng, SMALL_ROWS)
    assert nimbus.fit(A2, B2, "maddness", 8).ridge_chosen_ == 1e-2
    # an explicit penalty is used as given
    assert nimbus.fit(A, B, "maddness", 8, ridge=0.5).ridge_chosen_ == 0.5


def test_leave_one_out_ridge_removes_the_interpolation_peak(rng):
    # N close to C*K unknowns: the former fixed 1e-2 all but interpolates the training
    # rows; the penalty of least leave-one-out error does not
    A, B = _lowrank(rng, 700, D=64)
    tr, te = A[:140], A[140:]
    auto = nimbus.fit(tr, B, "maddness", 8)
    fixed = nimbus.fit(tr, B, "maddness", 8, ridge=1e-2)
    assert auto.ridge_chosen_ > 1e-2
    assert nimbus.nmse(te @ B, auto(te)) < nimbus.nmse(te @ B, fixed(te))


def test_dual_solve_equals_the_dense_one():
    rng = np.random.default_rng(2)
    N, C, K, M = 90, 16, 16, 5
    codes = rng.integers(0, K, (N, C)).astype(np.uint8)
    Y = rng.standard_normal((N, M)).astype(np.float32)
    prior = rng.standard_normal((C, K, M))
    r = CodeRidge(codes, Y, 0.3, lambda c, _: prior[c], K)
    assert r.dual                                   # N < C K and few rows
    G = onehot(codes, K, np.float64)
    ref = np.linalg.solve(G.T @ G + 0.3 * np.eye(C * K),
                          G.T @ Y + 0.3 * prior.reshape(C * K, -1)).reshape(C, K, M)
    np.testing.assert_allclose(r.solve(), ref, atol=1e-5)
    codes[:, 3] = rng.integers(0, K, N)             # an update keeps G G^T in step
    r.update(3)
    G = onehot(codes, K, np.float64)
    ref = np.linalg.solve(G.T @ G + 0.3 * np.eye(C * K),
                          G.T @ Y + 0.3 * prior.reshape(C * K, -1)).reshape(C, K, M)
    np.testing.assert_allclose(r.solve(), ref, atol=1e-5)


# ---------------------------------------------------------------------- clip from N
def test_clip_keeps_two_rows_a_tail_with_few_rows(rng):
    A, B = _heavy(rng, 100)
    assert nimbus.fit(A, B, "maddness", 4).clip_ == small_data_clip(1e-3, 100) == 0.02
    assert nimbus.fit(A, B, "maddness", 4, clip=0.0).clip_ == 0.0       # off stays off
    A2, B2 = _heavy(rng, SMALL_ROWS)
    assert nimbus.fit(A2, B2, "maddness", 4).clip_ == 1e-3


@pytest.mark.parametrize("method", ["maddness", "joint"])
def test_heavy_tails_with_few_rows_stay_below_the_zero_predictor(rng, method):
    A, B = _heavy(rng, 1050)
    tr, te = A[:50], A[50:]
    for C in (2, 4, 8):
        Y_hat = nimbus.fit(tr, B, method, C)(te)
        assert np.isfinite(Y_hat).all()
        assert nimbus.nmse(te @ B, Y_hat) < 1.0, C


# --------------------------------------------------------- joint against MADDNESS
def test_joint_checks_itself_by_leave_one_out_with_few_rows(rng):
    A, B = _lowrank(rng, 200)
    op = nimbus.fit(A, B, "joint", 8)
    assert op.selection_.startswith("leave-one-out check")
    assert op.choice_ in ("joint", "maddness")
    assert np.isfinite(op.cv_nmse_).all()
    rep = op.report()
    assert rep["choice"] == op.choice_ and rep["selection"] == op.selection_
    assert set(rep["cv_nmse"]) == {"joint", "maddness"}
    assert {"min_leaf", "ridge", "clip"} <= set(rep)
    # the kept fit is the one the rule prefers: joint only by the margin and by SELECT_Z
    # standard errors of the row differences
    mad = nimbus.fit(A, B, "maddness", 8)
    Y = (A @ B).astype(np.float64)
    j = Joint(8, refine=0, select=False).fit(A, B)
    e_j, e_m = op._loo_rows(j, A, B, Y), op._loo_rows(mad, A, B, Y)
    yss = ((Y - Y.mean(axis=0)) ** 2).sum()
    np.testing.assert_allclose(op.cv_nmse_, [e_j.sum() / yss, e_m.sum() / yss], rtol=1e-9)
    d = e_j - e_m
    wins = d.mean() + SELECT_Z * d.std(ddof=1) / np.sqrt(len(d)) < -SELECT_MARGIN * e_m.mean()
    assert op.choice_ == ("joint" if wins else "maddness")
    kept = j if wins else mad
    np.testing.assert_array_equal(op.prototypes_, kept.prototypes_)
    np.testing.assert_array_equal(op.thresholds_, kept.thresholds_)
    assert hasattr(op, "train_loss_") == wins
    # deterministic
    op2 = nimbus.fit(A, B, "joint", 8)
    np.testing.assert_array_equal(op.lut_, op2.lut_)


@pytest.mark.parametrize("method", ["maddness", "joint"])
def test_check_rows_are_leave_one_out_refits(rng, method):
    # each row's error is that of the LUT refit on the other rows (same trees, same
    # penalty) against the row's unclipped product
    from nimbus.strategies._clip import winsorize
    from nimbus.strategies._lut import ridge_on_codes
    A, B = _heavy(rng, 60, D=16, M=5)
    op = nimbus.fit(A, B, method, 4, **({"select": False} if method == "joint" else {}))
    Y = (A @ B).astype(np.float64)
    e = Joint(4)._loo_rows(op, A, B, Y)
    Aw = winsorize(A, op.clip_).astype(np.float64)
    codes = op.encode(Aw)
    lam = op.ridge_chosen_
    # the prior (each codebook's bucket means of its own clipped columns) is held fixed,
    # as ridge_loo documents; the penalty's part is refit without the row
    prior = np.zeros((4, 16, 16))
    for c in range(4):
        s, t = int(op.starts_[c]), int(op.starts_[c + 1])
        for k in np.unique(codes[:, c]):
            prior[c, k, s:t] = Aw[codes[:, c] == k, s:t].mean(axis=0)
    for n in (0, 7, 33, 59):
        keep = np.arange(60) != n
        P = (ridge_on_codes(codes[keep], Aw[keep].astype(np.float32), lam, 16,
                            prior=prior.astype(np.float32)) if np.isfinite(lam) else prior)
        pred = sum(P[c, codes[n, c]] for c in range(4)) @ B.astype(np.float64)
        assert e[n] == pytest.approx(((Y[n] - pred) ** 2).sum(), rel=2e-3)


def test_joint_keeps_maddness_where_its_own_fit_loses(rng):
    # B that ignores most of A's columns: the product trees see little, MADDNESS's trees
    # on A are as good; whichever wins, the kept fit is that strategy's own fit
    A, B = _lowrank(rng, 400)
    op = nimbus.fit(A[:300], B, "joint", 8)
    if op.choice_ == "maddness":
        mad = nimbus.fit(A[:300], B, "maddness", 8)
        np.testing.assert_array_equal(op.dims_, mad.dims_)
        np.testing.assert_array_equal(op.prototypes_, mad.prototypes_)
    else:
        assert op.cv_nmse_[0] < (1 - SELECT_MARGIN) * op.cv_nmse_[1]


def test_joint_with_many_rows_needs_no_check(rng):
    A, B = _lowrank(rng, SMALL_ROWS, D=16, M=4)
    op = nimbus.fit(A, B, "joint", 4)
    assert op.choice_ == "joint" and op.selection_.startswith("none needed")
    off = nimbus.fit(A[:200], B, "joint", 4, select=False)
    assert off.choice_ == "joint" and off.selection_.startswith("off")


def test_joint_fallback_with_too_few_rows_to_check(rng):
    # K <= N < 3 K: a fit is possible, a check is not; the documented fallback is
    # MADDNESS, named by the report
    A, B = _lowrank(rng, 40)
    op = nimbus.fit(A, B, "joint", 4)
    assert op.choice_ == "maddness"
    assert op.selection_.startswith("fallback") and "48" in op.selection_
    assert op.report()["selection"] == op.selection_
    assert np.isfinite(op(A)).all()
    mad = nimbus.fit(A, B, "maddness", 4)
    np.testing.assert_array_equal(op.prototypes_, mad.prototypes_)


@pytest.mark.parametrize("method", ["maddness", "joint"])
def test_fewer_rows_than_leaves_is_an_error_naming_the_minimum(rng, method):
    A, B = _lowrank(rng, 15)
    with pytest.raises(ValueError, match="at least 16"):
        nimbus.fit(A, B, method, 4)


# ------------------------------------------------- nothing fires from SMALL_ROWS on
def test_rules_do_not_fire_from_small_rows_on(rng):
    # the network conversion fits its initial trees on 1347-8192 rows: there the
    # learners are those before issue 17, bit for bit
    A, B = _lowrank(rng, SMALL_ROWS, D=32, M=6)
    new = Maddness(4).fit(A, B)
    old = Maddness(4, ridge=1e-2, min_leaf=1).fit(A, B)
    assert new.min_leaf_ == 1 and new.clip_ == 1e-3
    np.testing.assert_array_equal(new.prototypes_, old.prototypes_)
    np.testing.assert_array_equal(new.thresholds_, old.thresholds_)
    j = Joint(4, refine=2).fit(A, B)
    j_old = Joint(4, refine=2, ridge=1e-2, select=False, min_leaf=max(1, SMALL_ROWS // 500)).fit(A, B)
    assert j.ridge_chosen_ == 1e-2 and not hasattr(j, "clip_")
    np.testing.assert_array_equal(j.prototypes_, j_old.prototypes_)
    np.testing.assert_array_equal(j.train_loss_, j_old.train_loss_)
