"""Few training rows (issue 17): the rules MADDNESS and joint take from N below
``_lut.SMALL_ROWS`` rows (leaf size, ridge penalty, clip), joint's check against MADDNESS,
the fallback, the error for too few rows, and that none of it fires from SMALL_ROWS on."""
import numpy as np
import pytest

import nimbus
from nimbus.strategies import Joint, Maddness
from nimbus.strategies.joint import SELECT_MARGIN, SELECT_Z, SELECT_Z_MADDNESS, _beats
from nimbus.strategies._lut import (LOO_GRID, SMALL_ROWS, CodeRidge, onehot, path_levels,
                                    path_onehot, path_ridge_fit, path_ridge_loo, path_sums,
                                    ridge_loo, ridge_reg, small_data_clip)
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
def _refit_predict(codes, Z, n, depth, design, gamma, lam):
    """Row n's prediction of sum_c Z_c by the path-ridge model fitted on the other rows:
    prior (own bucket means, an emptied bucket falling back to its nearest ancestor with
    rows; the mean row) and ridge over the design's nodes, all without row n."""
    N, C = codes.shape
    K = 2 ** depth
    keep = np.arange(N) != n
    ck, Zk = codes[keep].astype(np.int64), Z[:, keep]
    Yk = Zk.sum(axis=0)

    def own(c, code):
        for level in range(depth, -1, -1):          # the deepest node with rows
            sel = (ck[:, c] >> (depth - level)) == (int(code) >> (depth - level))
            if sel.any():
                return Zk[c][sel].mean(axis=0)

    prior = lambda rows_codes: (gamma * sum(own(c, rows_codes[c]) for c in range(C))  # noqa
                                + (1 - gamma) * Yk.mean(axis=0))
    if not np.isfinite(lam):
        return prior(codes[n])
    R = Yk - np.stack([prior(ck[m]) for m in range(N - 1)])
    levels = path_levels(design, depth)
    G = path_onehot(codes, depth, levels)
    Gk = G[keep]
    coef = np.linalg.solve(Gk.T @ Gk + ridge_reg(lam, N, C, K) * np.eye(G.shape[1]), Gk.T @ R)
    return prior(codes[n]) + G[n] @ coef


@pytest.mark.parametrize("N", [40, 120])            # (N, N) and (F, F) eigendecompositions
def test_path_ridge_loo_is_the_leave_one_out_error_with_the_prior_refit(N):
    rng = np.random.default_rng(3)
    C, M, depth = 3, 4, 4
    codes = rng.integers(0, 16, (N, C)).astype(np.uint8)
    codes[:3, 0] = 15                               # a bucket of 3 rows ...
    codes[3:, 0] = np.minimum(codes[3:, 0], 13)     # ... whose sibling is empty
    codes[0, 1] = 7                                 # a bucket of one row, empty sibling
    codes[1:, 1] = np.where(codes[1:, 1] // 2 == 3, 0, codes[1:, 1])
    Z = np.stack([rng.standard_normal((N, M)) + 0.3 * codes[:, [c]] for c in range(C)])
    for design in ("leaf", "node"):
        res = path_ridge_loo(codes, Z, depth, design, (0.0, 0.5, 1.0), (0.1, 3.0, np.inf))
        assert len(res) == 9
        for (g, lam), E in res.items():
            for n in (0, 1, 2, 5, N - 1):
                pred = _refit_predict(codes, Z, n, depth, design, g, lam)
                np.testing.assert_allclose(E[n], Z[:, n].sum(axis=0) - pred, atol=1e-9,
                                           err_msg=f"{design} {g} {lam} row {n}")


def test_path_ridge_fit_is_the_product_fit_and_leaf_gamma_one_is_maddness_s_model(rng):
    A, B = _lowrank(rng, 120, D=16, M=5)
    A = A.astype(np.float64)
    op = Maddness(4).fit(A.astype(np.float32), B)
    codes = op.encode(A.astype(np.float32))
    for design, g, lam in (("node", 0.5, 0.3), ("node", 0.0, 3.0), ("leaf", 1.0, 10.0)):
        P = path_ridge_fit(codes, A, op.starts_, 4, design, g, lam)
        assert P.shape == (4, 16, 16) and P.dtype == np.float32
        # the leave-one-out residuals' fit on all rows: the same model in product space,
        # checked through its training residuals (the hat of the model)
        pred = sum(P[c][codes[:, c]] for c in range(4)).astype(np.float64) @ B
        Z = np.stack([A[:, s:e] @ B[s:e] for s, e in zip(op.starts_[:-1], op.starts_[1:])])
        r = path_ridge_loo(codes, Z, 4, design, (g,), (lam,))[(g, lam)]
        assert np.isfinite(r).all()
        own = np.zeros_like(pred)
        for c in range(4):
            for k in np.unique(codes[:, c]):
                own[codes[:, c] == k] += Z[c][codes[:, c] == k].mean(axis=0)
        prior = g * own + (1 - g) * (A @ B).mean(axis=0)
        G = path_onehot(codes, 4, path_levels(design, 4))
        reg = ridge_reg(lam, 120, 4, 16)
        fit = prior + G @ np.linalg.solve(G.T @ G + reg * np.eye(G.shape[1]),
                                          G.T @ (A @ B - prior))
        np.testing.assert_allclose(pred, fit, rtol=1e-4, atol=1e-3)
    # design "leaf" at gamma 1 is MADDNESS's ridge over its own bucket means: its fit
    # (on its clipped rows) comes back
    from nimbus.strategies._clip import winsorize
    for lam in (0.3, 10.0):
        m = Maddness(4, ridge=lam).fit(A.astype(np.float32), B)
        Aw = winsorize(A.astype(np.float32), m.clip_)
        P = path_ridge_fit(m.encode(Aw), Aw, m.starts_, 4, "leaf", 1.0, lam)
        np.testing.assert_allclose(P, m.prototypes_, rtol=1e-4, atol=1e-4)


def test_path_onehot_and_path_sums():
    codes = np.array([[0, 15], [5, 8]], dtype=np.uint8)
    G = path_onehot(codes, 4, (1, 2, 3, 4))
    assert G.shape == (2, 2 * 30) and (G.sum(axis=1) == 8).all()
    # row 0, codebook 0: leaf 0, its ancestors 0 at every level
    assert G[0, [0, 2, 6, 14]].tolist() == [1, 1, 1, 1]
    # row 1, codebook 1 (offset 30): leaf 8 -> level 1 node 1, level 2 node 2, level 3 node 4
    assert G[1, [30 + 1, 30 + 2 + 2, 30 + 6 + 4, 30 + 14 + 8]].tolist() == [1, 1, 1, 1]
    coef = np.arange(60, dtype=np.float64)[:, None]
    L = path_sums(coef, 2, 4, (1, 2, 3, 4))
    np.testing.assert_array_equal(L[:, :, 0].ravel()[[0, 16 + 8]],
                                  [0 + 2 + 6 + 14, 31 + 34 + 40 + 52])
    np.testing.assert_array_equal(path_onehot(codes, 4, (4,)), onehot(codes, 16, np.float64))


def test_beats_needs_the_margin_and_the_standard_errors():
    rng = np.random.default_rng(0)
    ref = 1.0 + rng.random(400)
    assert _beats(0.8 * ref, ref, 0.05, 3.0)
    assert not _beats(0.97 * ref, ref, 0.05, 3.0)           # below the margin
    noisy = ref * (0.9 + 0.8 * rng.standard_normal(400))      # lower on average, noisy
    assert not _beats(noisy, ref, 0.0, 3.0)
    assert not _beats(ref, ref, 0.0, 0.0)


def test_joint_checks_itself_by_leave_one_out_with_few_rows(rng):
    A, B = _lowrank(rng, 200)
    op = nimbus.fit(A, B, "joint", 8)
    assert op.selection_.startswith("leave-one-out check")
    assert op.choice_ in ("joint", "maddness") and op.trees_ in ("joint", "maddness")
    assert np.isfinite(op.cv_nmse_).all() and op.cv_nmse_[0] <= op.cv_nmse_[1]
    rep = op.report()
    assert rep["choice"] == op.choice_ and rep["selection"] == op.selection_
    assert rep["trees"] == op.trees_
    assert set(rep["cv_nmse"]) == {"kept", "maddness"}
    assert {"min_leaf", "ridge", "clip"} <= set(rep)
    # the kept fit is the one the rule prefers: a model on MADDNESS's trees by SELECT_Z_MADDNESS
    # standard errors, then one on the joint trees by SELECT_MARGIN and SELECT_Z
    mad = nimbus.fit(A, B, "maddness", 8)
    j = Joint(8, refine=0, select=False).fit(A, B)
    Y = (A @ B).astype(np.float64)
    lam = mad.ridge_chosen_
    e_mad = op.lut_model_rows(mad, A, B, Y, ("leaf",), (1.0,), (lam,))[("leaf", 1.0, lam)]
    best = (None, None, e_mad)
    for trees, fitted, margin, z in (("maddness", mad, 0.0, SELECT_Z_MADDNESS),
                                     ("joint", j, SELECT_MARGIN, SELECT_Z)):
        ref = best[2]
        for cfg, e in op.lut_model_rows(fitted, A, B, Y).items():
            if _beats(e, ref, margin, z) and e.sum() < best[2].sum():
                best = (trees, cfg, e)
    yss = ((Y - Y.mean(axis=0)) ** 2).sum()
    np.testing.assert_allclose(op.cv_nmse_, [best[2].sum() / yss, e_mad.sum() / yss], rtol=1e-9)
    if best[1] is None:
        assert rep["lut_model"] == "maddness" and op.choice_ == "maddness"
        np.testing.assert_array_equal(op.prototypes_, mad.prototypes_)
    else:
        assert op.choice_ == "joint" and op.trees_ == best[0]
        assert rep["lut_model"] == dict(zip(("design", "gamma", "ridge"), best[1]))
        kept = j if best[0] == "joint" else mad
        np.testing.assert_array_equal(op.thresholds_, kept.thresholds_)
        assert hasattr(op, "train_loss_") == (best[0] == "joint")
    # deterministic
    op2 = nimbus.fit(A, B, "joint", 8)
    np.testing.assert_array_equal(op.lut_, op2.lut_)


def test_lut_models_beat_maddness_on_low_rank_rows_with_few_rows(rng):
    # rank-4 rows: every codebook's code says something about every column, which the
    # node models with a shared prior use and MADDNESS's own-bucket prior does not
    A, B = _lowrank(rng, 1100)
    tr, te = A[:100], A[100:]
    op = nimbus.fit(tr, B, "joint", 16)
    mad = nimbus.fit(tr, B, "maddness", 16)
    assert op.choice_ == "joint" and op.lut_design_ == "node"
    assert nimbus.nmse(te @ B, op(te)) < 0.8 * nimbus.nmse(te @ B, mad(te))


def test_joint_keeps_maddness_where_nothing_beats_it(rng):
    # heavy tails with few rows: the leave-one-out errors are too noisy for any model to
    # clear the bar; the kept fit is then MADDNESS's own, array for array
    A, B = _heavy(rng, 60)
    op = nimbus.fit(A, B, "joint", 8)
    if op.choice_ == "maddness":
        mad = nimbus.fit(A, B, "maddness", 8)
        assert op.lut_design_ == op.trees_ == "maddness"
        np.testing.assert_array_equal(op.dims_, mad.dims_)
        np.testing.assert_array_equal(op.prototypes_, mad.prototypes_)
    else:
        assert op.cv_nmse_[0] < op.cv_nmse_[1]


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
