"""The strategies' one tree learner (_trees.learn_tree) and one ridge solver over codes
(_lut.CodeRidge): options, leaf sizes, incremental updates, bad input, NumPy/CuPy."""
import numpy as np
import pytest

from nimbus.arrays import backend, kernels
from nimbus.strategies import _lut
from nimbus.strategies._trees import learn_tree, midpoints, top_directions


def _h(x):
    return backend.to_host(x)


def _data(rng, n=600, D=5):
    X = np.concatenate([rng.integers(0, 5, size=(n, 2)),           # ties: small alphabets
                        rng.standard_normal((n, D - 2))], axis=1).astype(np.float32)
    T = X @ rng.standard_normal((D, 3)) + 0.1 * rng.standard_normal((n, 3))
    return X, T


def _subtree_rows(leaves, depth, node):
    """(rows in the left subtree, rows in the right subtree) of heap node ``node``."""
    level = int(np.floor(np.log2(node + 1)))
    b = node - (2 ** level - 1)                    # bucket index within its level
    shift = depth - level - 1                      # levels below the node's children
    child = leaves >> shift                        # bucket at the children's level
    return int((child == 2 * b).sum()), int((child == 2 * b + 1).sum())


@pytest.mark.parametrize("search", ["exact", "binned"])
@pytest.mark.parametrize("split", ["level", "node"])
def test_every_option_encodes_as_it_learned(xp, rng, search, split):
    X, T = _data(rng)
    X, T = xp.asarray(X), xp.asarray(T)
    depth = 4
    dims, thr, leaves = learn_tree(X, range(1, 5), T, split, None, depth, search=search)
    assert dims.dtype == np.int32 and thr.dtype == np.float32 and dims.shape == (15,)
    assert set(dims.tolist()) <= {1, 2, 3, 4}       # only the columns it was given
    codes = kernels.encode_tree(X, xp.asarray(dims[None]), xp.asarray(thr[None]))
    np.testing.assert_array_equal(_h(codes[:, 0]), _h(leaves))
    if split == "level":
        for lo, hi in ((1, 3), (3, 7), (7, 15)):
            assert len(set(dims[lo:hi].tolist())) == 1


@pytest.mark.parametrize("search", ["exact", "binned"])
def test_min_leaf_holds_at_every_split(rng, search):
    X, T = _data(rng, n=400)
    depth, min_leaf = 4, 20
    dims, thr, leaves = learn_tree(X, range(5), T, "node", None, depth, search=search,
                                   min_leaf=min_leaf)
    leaves = leaves.astype(np.int64)
    split_nodes = np.flatnonzero(np.isfinite(thr))
    assert len(split_nodes) > 3
    for node in split_nodes:
        nl, nr = _subtree_rows(leaves, depth, node)
        assert nl >= min_leaf and nr >= min_leaf, (node, nl, nr)


def test_exact_search_finds_the_best_first_split(rng):
    # one level: the split must remove at least as much SSE as any cut a brute force tries
    X, T = _data(rng, n=300)
    dims, thr, leaves = learn_tree(X, range(5), T, "level", None, 1)
    def sse(rows):
        return ((T[rows] - T[rows].mean(axis=0)) ** 2).sum() if rows.any() else 0.0
    got = sse(leaves == 0) + sse(leaves == 1)
    best = min(sse(X[:, j] <= u) + sse(X[:, j] > u)
               for j in range(5) for u in np.unique(X[:, j])[:-1])
    assert got <= best * (1 + 1e-9)


def test_max_candidates_restricts_the_search(rng):
    # exact search screens by each column's own within-bucket SSE: the widest column wins
    X = rng.standard_normal((500, 6)).astype(np.float32)
    X[:, 4] *= 50.0
    dims, _, _ = learn_tree(X, range(6), None, "level", 1, 3)
    assert set(dims.tolist()) == {4}


def test_bad_options(rng):
    X, T = _data(rng, n=50)
    with pytest.raises(ValueError, match="split"):
        learn_tree(X, range(5), T, "leaf")
    with pytest.raises(ValueError, match="search"):
        learn_tree(X, range(5), T, search="histogram")


def test_midpoints_separate_neighbouring_floats():
    lo = np.array([0.0, 1.0, np.float32(1.0)], dtype=np.float32)
    hi = np.array([1.0, 3.0, np.nextafter(np.float32(1.0), np.float32(2.0))], dtype=np.float32)
    t = midpoints(lo, hi)
    assert t.dtype == np.float32
    assert (lo <= t).all() and (t < hi).all()
    np.testing.assert_array_equal(t[:2], [0.5, 2.0])
    assert t[2] == lo[2]                               # the midpoint rounds up to hi: lo


def test_top_directions_span_the_top_principal_subspace(xp, rng):
    R = rng.standard_normal((3000, 3)) @ rng.standard_normal((3, 10)) * [[5.0, 3.0, 1.0, 1, 1, 1, 1, 1, 1, 1]]
    R = R + 0.01 * rng.standard_normal((3000, 10))
    V = _h(top_directions(xp.asarray(R), 3, dtype=np.float64))
    assert V.shape == (10, 3)
    np.testing.assert_allclose(V.T @ V, np.eye(3), atol=1e-10)
    Rc = R - R.mean(axis=0)
    U = np.linalg.svd(Rc, full_matrices=False)[2][:3].T       # reference: SVD
    # same subspace: the projections agree
    np.testing.assert_allclose(V @ V.T, U @ U.T, atol=1e-6)


def _normal_equations(codes, Y, reg, prior, K):
    """The ridge solution by the textbook formula in float64 (one-hot matrix)."""
    G = _lut.onehot(codes, K, np.float64)
    CK = G.shape[1]
    rhs = G.T @ Y.astype(np.float64) + reg * prior.reshape(CK, -1)
    return np.linalg.solve(G.T @ G + reg * np.eye(CK), rhs).reshape(prior.shape)


def test_code_ridge_equals_the_normal_equations_and_updates(xp, rng):
    N, C, K, M = 900, 3, 8, 4
    codes = rng.integers(0, K, size=(N, C)).astype(np.uint8)
    Y = rng.standard_normal((N, M)).astype(np.float32)
    prior = rng.standard_normal((C, K, M))
    reg = 2.5
    ridge = _lut.CodeRidge(xp.asarray(codes), xp.asarray(Y), reg,
                           lambda c, _: xp.asarray(prior[c]), K)
    assert ridge.dense
    np.testing.assert_allclose(_h(ridge.solve()), _normal_equations(codes, Y, reg, prior, K),
                               rtol=1e-5, atol=1e-6)
    # change one codebook's codes in place: update(c) gives what a fresh solve gives
    new = rng.integers(0, K, size=N).astype(np.uint8)
    ridge.codes[:, 1] = xp.asarray(new)
    codes[:, 1] = new
    ridge.update(1)
    np.testing.assert_allclose(_h(ridge.solve()), _normal_equations(codes, Y, reg, prior, K),
                               rtol=1e-5, atol=1e-6)
    # other targets, other prior: the same regression
    X = rng.standard_normal((N, 2)).astype(np.float32)
    p2 = rng.standard_normal((C, K, 2))
    np.testing.assert_allclose(_h(ridge.solve(xp.asarray(X), xp.asarray(p2))),
                               _normal_equations(codes, X, reg, p2, K), rtol=1e-5, atol=1e-6)


def test_blockwise_sweeps_approach_the_dense_solution(rng):
    N, C, K, M = 2000, 4, 16, 3
    codes = rng.integers(0, K, size=(N, C)).astype(np.uint8)
    # centred targets: the slowest Gauss-Seidel mode is an offset traded between codebooks
    Y = (rng.standard_normal((N, M)) + codes[:, :1] - 7.5).astype(np.float32)
    want = _lut.ridge_on_codes(codes, Y, 0.5, K, dense=True)
    errs = [np.abs(_lut.ridge_on_codes(codes, Y, 0.5, K, dense=False) - want).max()]
    ridge = _lut.CodeRidge(codes, Y, _lut.ridge_reg(0.5, N, C, K),
                           lambda c, _: np.zeros((K, M)), K, dense=False, sweeps=60)
    errs.append(np.abs(ridge.solve() - want).max())
    assert errs[1] < 0.1 * errs[0] and errs[1] < 1e-3 * np.abs(want).max(), errs


def test_ridge_on_codes_infinite_penalty_is_the_prior(rng):
    codes = rng.integers(0, 16, size=(100, 2)).astype(np.uint8)
    prior = rng.standard_normal((2, 16, 3)).astype(np.float32)
    P = _lut.ridge_on_codes(codes, rng.standard_normal((100, 3)).astype(np.float32),
                            float("inf"), prior=prior)
    np.testing.assert_array_equal(P, prior)
