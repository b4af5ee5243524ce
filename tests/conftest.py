"""Shared fixtures. Random inputs come from a fixed default seed; ``SPARSEK_TEST_SEED=<n>`` picks another and
``SPARSEK_TEST_SEED=random`` draws a fresh one (fuzzing). Every failure prints the seed that replays it."""

import faulthandler
import gc
import os
import shutil
import tempfile
import zlib

import numpy as np
import pytest

_REQUESTED = os.environ.get("SPARSEK_TEST_SEED", "0")
_SESSION_SEED = (int(np.random.SeedSequence().entropy % (2**32)) if _REQUESTED == "random" else int(_REQUESTED))
os.environ["SPARSEK_TEST_SEED"] = str(_SESSION_SEED)  # pytest-xdist workers inherit the same seed

# Many tests (and the subprocesses the app tests start) compile the same tiny train and eval steps; one
# persistent compilation cache for the session, shared by the xdist workers through the environment, compiles
# each program once. A fresh directory per session, so no executable outlives the code that built it.
# jax reads these variables when it is imported: a pytest plugin that imports jax before this file loads
# runs the session without the cache (and times every repeated compile).
_OWN_CACHE = "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsek-tests-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


# Compiling is most of the suite's time on CPU. Two XLA settings make it faster without changing IEEE results
# (XLA enables no fast math): LLVM at -O0 (its optimisations took about 40% of each compile), and XLA's elemental
# LLVM IR emitters instead of its MLIR fusion emitters, which create and tear down an MLIR context per fused
# kernel (a SparseK forward+backward at test size: 1.0-1.2 s to compile rather than 2.7-2.8 s; the suite: 5.2
# minutes rather than 8.8). The tests (and the processes they start, which inherit the environment) use both
# unless XLA_FLAGS names them; `SPARSEK_TEST_XLA_DEFAULTS=1` keeps XLA's defaults (test_default_compiler.py runs
# the core comparisons that way). The flags would reach a GPU's or TPU's compiles too, so machines with one keep
# the defaults.
_ACCELERATOR = any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio"))
FAST_COMPILE_FLAGS = {"xla_backend_optimization_level": "0",
                      "xla_backend_extra_options": "xla_cpu_disable_new_fusion_emitters"}
os.environ.setdefault("SPARSEK_TEST_BASE_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # before any additions
if not _ACCELERATOR and os.environ.get("SPARSEK_TEST_XLA_DEFAULTS") != "1":
    _flags = os.environ.get("XLA_FLAGS", "")
    for _name, _value in FAST_COMPILE_FLAGS.items():
        if _name not in _flags:
            _flags = f"{_flags} --{_name}={_value}".strip()
    os.environ["XLA_FLAGS"] = _flags


# Tracing allocates millions of short-lived objects, and with Python's default thresholds the collector's full
# passes over a worker's large heap (jaxprs, lowered modules) cost about 3% of the suite's CPU. Young objects are
# collected 70 times less often; `_drop_compiled_programs` below still runs a full collection after each module.
gc.set_threshold(50_000, 20, 100)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    # A worker that dies in native code (a segfault in a compiled library) prints its stacks to a stderr that
    # CI logs cut; with SPARSEK_FAULT_DIR set, each process also keeps them in a file that .ci/run prints.
    fault_dir = os.environ.get("SPARSEK_FAULT_DIR")
    if fault_dir:
        name = os.environ.get("PYTEST_XDIST_WORKER", "main")
        config._sparsek_fault_log = open(os.path.join(fault_dir, f"fault-{name}-{os.getpid()}.log"), "w")
        faulthandler.enable(file=config._sparsek_fault_log, all_threads=True)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Each test module's compiled programs are dropped when it ends (the tests within a module still share
    them). A worker otherwise keeps every executable of the session loaded, gigabytes by the end; and, late in
    sessions, workers died in native code four times, each in a test_train test, three times seen loading the
    first training step's executable (XLA's compile-and-load, or a read from the compilation cache). Not
    explained; smaller workers are the one difference that is cheap to make."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()


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
