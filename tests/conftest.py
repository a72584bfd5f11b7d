"""Shared fixtures: every array test runs with xp=numpy and, marked `gpu`, xp=cupy.

Without a CUDA device the cupy cases are skipped; `pytest --require-gpu` turns
that skip into a failure (for runs on the GPU machine).

Under compute-sanitizer set NIMBUS_NO_CUPY_POOL=1 (CuPy's memory pool off).

Random data: the `rng` fixture draws a fresh seed per session (printed in the
header; set NIMBUS_TEST_SEED to replay one), so no test is tuned to one seed.
"""
import os
import zlib

import numpy as np
import pytest

from nimbus.arrays import backend

SESSION_SEED = int(os.environ.get("NIMBUS_TEST_SEED", np.random.SeedSequence().entropy % 2**31))


def pytest_addoption(parser):
    parser.addoption("--require-gpu", action="store_true", default=False,
                     help="fail (instead of skip) tests marked gpu when no CUDA device is usable")


def pytest_configure(config):
    # under compute-sanitizer the memory pool would hide out-of-bounds accesses inside
    # its larger blocks: NIMBUS_NO_CUPY_POOL=1 gives every allocation its true bounds
    if os.environ.get("NIMBUS_NO_CUPY_POOL") and backend.has_cuda():
        backend.cupy().cuda.set_allocator(None)


def pytest_report_header(config):
    return f"nimbus: NIMBUS_TEST_SEED={SESSION_SEED}; CUDA device usable: {backend.has_cuda()}"


def pytest_collection_modifyitems(config, items):
    if backend.has_cuda() or config.getoption("--require-gpu"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and CuPy (--require-gpu to insist)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _gpu_guard(request):
    if "gpu" in request.keywords and not backend.has_cuda():
        pytest.fail("--require-gpu was given but no CUDA device is usable")


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: numpy, or cupy (marked gpu)."""
    return np if request.param == "numpy" else backend.cupy()


@pytest.fixture
def rng(request):
    """A generator seeded from the session seed and the test's id (reproducible with
    NIMBUS_TEST_SEED, different every session otherwise)."""
    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])
