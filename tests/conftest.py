"""Shared fixtures. Random inputs are drawn fresh on every run; the seed is printed with any failure and
can be replayed with SPARSEK_TEST_SEED=<seed>."""

import os
import zlib

import numpy as np
import pytest


_SESSION_SEED = int(os.environ.get("SPARSEK_TEST_SEED", np.random.SeedSequence().entropy % (2**32)))
os.environ["SPARSEK_TEST_SEED"] = str(_SESSION_SEED)  # pytest-xdist workers inherit the same seed


def pytest_report_header(config):
    return f"sparsek random seed: SPARSEK_TEST_SEED={_SESSION_SEED}"


@pytest.fixture
def rng(request):
    """A generator seeded from the session seed and the test's id (stable across xdist workers)."""
    seed = (_SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**32)
    request.node.user_properties.append(("seed", _SESSION_SEED))
    return np.random.default_rng(seed)


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None and call.when == "call":
        print(f"\n[replay with SPARSEK_TEST_SEED={_SESSION_SEED}]")


def pytest_collection_modifyitems(config, items):
    import jax

    platforms = {d.platform for d in jax.devices()}
    for item in items:
        if "gpu" in item.keywords and "gpu" not in platforms:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
        if "tpu" in item.keywords and "tpu" not in platforms:
            item.add_marker(pytest.mark.skip(reason="needs a TPU"))
