"""Our MADDNESS and PQ against the published figures of ANCHORS.md (tolerance +5%).

MADDNESS must be at or below the published learner's 8-bit NMSE on every synthetic
task and, on sklearn digits, at or below the published learner with its tie bug
fixed; PQ at or below PQ-16 (Bolt). The data follow the published seeds exactly.
"""
import functools

import numpy as np
import pytest

import nimbus
from tests.anchor_data import DIGITS_ANCHORS, SYNTH_ANCHORS, digits_task, make_data

TOL = 1.05


@functools.lru_cache(maxsize=None)
def _data(kind, D, M):
    A_tr, A_te, B = make_data(kind, 20000, 5000, D, M)
    return A_tr, A_te, B, A_te @ B


@pytest.mark.parametrize("key", sorted(SYNTH_ANCHORS), ids=lambda k: "%s-D%d-M%d-C%d" % k)
@pytest.mark.parametrize("method,col", [("maddness", 0), ("pq", 1)])
def test_synth_anchor(key, method, col):
    kind, D, M, C = key
    A_tr, A_te, B, Y = _data(kind, D, M)
    op = nimbus.fit(A_tr, B, method=method, ncodebooks=C, random_state=0)
    err = nimbus.nmse(Y, op(A_te))
    assert err <= SYNTH_ANCHORS[key][col] * TOL, f"{method} {key}: {err:.4f}"


@pytest.mark.parametrize("C", sorted(DIGITS_ANCHORS))
@pytest.mark.parametrize("method,col", [("maddness", 0), ("pq", 1)])
def test_digits_anchor(C, method, col):
    A_tr, A_te, B = digits_task()
    op = nimbus.fit(A_tr, B, method=method, ncodebooks=C, random_state=0)
    err = nimbus.nmse(A_te @ B, op(A_te))
    assert err <= DIGITS_ANCHORS[C][col] * TOL, f"{method} C={C}: {err:.4f}"


def test_float_lut_close_to_8bit():
    # exact int32 sums of 8-bit entries cost little (ANCHORS: under .002 NMSE)
    A_tr, A_te, B, Y = _data("gauss", 32, 16)
    q = nimbus.fit(A_tr, B, ncodebooks=32, quantize=True)
    f = nimbus.fit(A_tr, B, ncodebooks=32, quantize=False)
    assert nimbus.nmse(Y, q(A_te)) - nimbus.nmse(Y, f(A_te)) < 0.002
