"""The core comparisons again with XLA's default CPU compiler settings. The suite compiles with faster settings
(`conftest.py`: LLVM -O0, XLA's elemental emitters), which change no IEEE result; this runs the densest checks of
the operator and the attention in a pytest process of their own as a user's program compiles them, so that a
difference between XLA's code generators would show here: the XLA path's forward and gradients against the
reference (GQA 4:1, ties, documents, a length that is not a whole number of blocks), the thresholds against brute
force, and the Pallas thresholds kernels against the XLA path bit for bit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
NODES = ["test_xla_attention.py::test_matches_reference_forward_and_gradients[50-8-2-7-3-value-16-True-True]",
         "test_thresholds.py::test_matches_brute_force[50-2-4-9-True-True-16]",
         "test_thresholds.py::test_pallas_kernels_match_xla_exactly[45-2-5-3-True-True-8-16-float32]"]


@pytest.mark.slow
def test_core_comparisons_pass_with_the_default_compiler():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(XLA_FLAGS=os.environ["SPARSEK_TEST_BASE_XLA_FLAGS"], SPARSEK_TEST_XLA_DEFAULTS="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                           *(str(HERE / node) for node in NODES)],
                          capture_output=True, text=True, cwd=HERE.parent, env=env, timeout=600)
    assert done.returncode == 0 and f"{len(NODES)} passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]
