import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sparsek_jax as sk
from oracles import bisect_threshold, sparsek_np, sparsemax_np


def random_scores(rng, m):
    """Random scores of varied scale, sometimes with ties and flat stretches."""
    z = rng.normal(size=m) * rng.choice([0.1, 1.0, 5.0])
    kind = rng.integers(3)
    if kind == 1:
        z = np.round(z, 1)  # many ties
    elif kind == 2:
        z[rng.integers(m, size=m // 2)] = z[0]  # a flat stretch
    return z.astype(np.float32)


def test_matches_bisection_solver(rng):
    # One batched call: rows of random scores, random valid subsets (masks), integer and fractional k.
    rows, m = 160, 48
    z = np.stack([random_scores(rng, m) for _ in range(rows)])
    num_valid = rng.integers(1, m + 1, size=rows)
    mask = np.stack([rng.permutation(m) < c for c in num_valid])
    k = np.array([rng.choice([1, 2, 3, 0.5, 1.7, c / 3 + 0.1, max(c - 0.5, 0.25), c + 2]) for c in num_valid],
                 np.float32)
    p = np.asarray(sk.sparsek(jnp.asarray(z), jnp.asarray(k), mask=jnp.asarray(mask)))
    tau = np.asarray(sk.sparsek_threshold(jnp.asarray(z), jnp.asarray(k), mask=jnp.asarray(mask)))
    for r in range(rows):
        expected = np.zeros(m)
        expected[mask[r]] = sparsek_np(z[r, mask[r]], k[r])
        scale = float(max(1.0, np.abs(z[r]).max()))
        np.testing.assert_allclose(p[r], expected, atol=3e-6 * scale, err_msg=f"row {r}: z={z[r].tolist()} "
                                   f"k={k[r]} mask={mask[r].tolist()}")
        expected_tau = bisect_threshold(z[r, mask[r]].astype(np.float64), k[r])
        if np.isfinite(expected_tau):
            assert tau[r] == pytest.approx(expected_tau, abs=3e-6 * scale)
        else:
            assert tau[r] == -np.inf
        assert p[r].sum() == pytest.approx(min(k[r], num_valid[r]), abs=1e-4)


def test_sum_and_bounds(rng):
    z = jnp.asarray(rng.normal(size=(16, 50)).astype(np.float32) * 3)
    ks = jnp.asarray(rng.uniform(0.5, 20, size=16).astype(np.float32))
    p = sk.sparsek(z, ks[:, None][:, 0])
    np.testing.assert_allclose(p.sum(-1), ks, rtol=1e-5, atol=1e-4)
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0


def test_k1_is_sparsemax(rng):
    z = np.stack([random_scores(rng, 33) for _ in range(30)])
    p = np.asarray(sk.sparsek(jnp.asarray(z), 1))
    for r in range(len(z)):
        np.testing.assert_allclose(p[r], sparsemax_np(z[r]), atol=3e-6 * max(1.0, np.abs(z[r]).max()))


def test_at_most_k_valid_entries_gives_ones():
    z = jnp.array([0.3, -2.0, 5.0, 1.0])
    mask = jnp.array([True, False, True, False])
    np.testing.assert_array_equal(sk.sparsek(z, 2, mask=mask), [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(sk.sparsek(z, 7), [1.0, 1.0, 1.0, 1.0])
    assert float(sk.sparsek_threshold(z, 2, mask=mask)) == -np.inf


def test_smallest_threshold_when_not_unique():
    # Any tau in [0, 2] solves it for k=2 (gap of 3 below the 2nd score): take the (k+1)-th largest.
    z = jnp.array([5.0, 3.0, 0.0, -4.0])
    assert float(sk.sparsek_threshold(z, 2)) == 0.0
    np.testing.assert_array_equal(sk.sparsek(z, 2), [1.0, 1.0, 0.0, 0.0])
    # Exact in float32 too when the scores are not representable: tau is the 3rd score itself.
    z = jnp.array([2.0, 0.3, 1.9, -0.5])
    assert float(sk.sparsek_threshold(z, 2)) == float(z[1])
    np.testing.assert_array_equal(sk.sparsek(z, 2), [1.0, 0.0, 1.0, 0.0])


def test_smallest_threshold_on_random_flat_stretches(rng):
    # A gap of at least 1 below the k-th score: tau must be exactly the (k+1)-th score, never the upper end.
    rows, m, k = 200, 24, 5
    top = rng.uniform(1.0, 3.0, size=(rows, k)) + 1.0
    rest = rng.uniform(-3.0, 0.0, size=(rows, m - k))
    z = np.concatenate([top + rest.max(1, keepdims=True), rest], axis=1).astype(np.float32)
    z = np.stack([rng.permutation(row) for row in z]) * rng.choice([0.9, 1.0, 7.3], size=(rows, 1)).astype(np.float32)
    z = z.astype(np.float32)
    tau = np.asarray(sk.sparsek_threshold(jnp.asarray(z), k))
    expected = -np.sort(-z, axis=1)[:, k]
    gap_ok = (-np.sort(-z, axis=1)[:, k - 1] - expected) >= 1.0
    np.testing.assert_array_equal(tau[gap_ok], expected[gap_ok])
    assert gap_ok.sum() > rows // 2


def well_separated(rng, m):
    """Scores whose breakpoints (z_j and z_j - 1) are far apart, so finite differences stay on one piece."""
    z = rng.permutation(np.arange(m)) * 0.37 + rng.uniform(-0.05, 0.05, m)
    return jnp.asarray(z / 2.0, jnp.float32)


@pytest.mark.parametrize("k", [1, 2.5, 4])
def test_vjp_finite_differences(rng, k):
    z = well_separated(rng, 9)
    check_grads(lambda x: sk.sparsek(x, k), (z,), order=1, modes=("rev",), eps=1e-3, atol=5e-3, rtol=5e-3)


def test_vjp_closed_form(rng):
    for k in rng.uniform(1, 6, size=4):
        z = well_separated(rng, 12)
        k = float(k)
        p = np.asarray(sk.sparsek(z, k), np.float64)
        fractional = (p > 0) & (p < 1)
        count = fractional.sum()
        expected = np.diag(fractional.astype(float)) - np.outer(fractional, fractional) / max(count, 1)
        np.testing.assert_allclose(jax.jacrev(lambda x: sk.sparsek(x, k))(z), expected, atol=1e-6)


def test_gradient_with_respect_to_k(rng):
    z = well_separated(rng, 10)
    w = jnp.asarray(rng.normal(size=10).astype(np.float32))
    f = lambda kk: jnp.sum(sk.sparsek(z, kk) * w)
    eps = 1e-3
    fractional = lambda kk: tuple(np.asarray((sk.sparsek(z, kk) > 0) & (sk.sparsek(z, kk) < 1)))
    # p is piecewise linear in k: take a k whose piece extends past k +- eps, then differences are exact.
    k = next(kk for kk in np.linspace(2.05, 6.95, 50) if fractional(kk - eps) == fractional(kk + eps))
    fd = (f(k + eps) - f(k - eps)) / (2 * eps)
    assert float(jax.grad(f)(k)) == pytest.approx(float(fd), rel=1e-2, abs=1e-3)


def test_masked_entries_get_no_gradient(rng):
    z = well_separated(rng, 8)
    mask = jnp.array([True, False] * 4)
    g = jax.grad(lambda x: jnp.sum(sk.sparsek(x, 2, mask=mask) * jnp.arange(8.0)))(z)
    assert np.all(np.asarray(g)[1::2] == 0)


def test_jit_vmap_dtypes(rng):
    z = jnp.asarray(rng.normal(size=(3, 5, 20)).astype(np.float32))
    eager = sk.sparsek(z, 3)
    np.testing.assert_allclose(jax.jit(lambda x: sk.sparsek(x, 3))(z), eager, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(lambda x: sk.sparsek(x, 3))(z), eager, atol=1e-6)
    per_row_k = jnp.arange(1.0, 4.0)
    vk = jax.vmap(lambda x, kk: sk.sparsek(x, kk))(z, per_row_k)
    np.testing.assert_allclose(vk.sum(-1), jnp.broadcast_to(per_row_k[:, None], (3, 5)), atol=1e-4)
    assert sk.sparsek(z.astype(jnp.bfloat16), 3).dtype == jnp.bfloat16
    tau = jax.jit(lambda x: sk.sparsek_threshold(x, 3))(z)
    assert tau.shape == (3, 5) and tau.dtype == jnp.float32


@pytest.mark.parametrize("call, match", [
    (lambda: sk.sparsek(jnp.ones(4), 0), "k: expected a positive"),
    (lambda: sk.sparsek(jnp.ones(4), -1.5), "k: expected a positive"),
    (lambda: sk.sparsek(jnp.ones(4, jnp.int32), 1), "z: expected a floating-point array, received dtype int32"),
    (lambda: sk.sparsek(jnp.ones(4), 1, mask=jnp.ones(3, bool)), r"mask: expected .* \(4,\), received shape \(3,\)"),
    (lambda: sk.sparsek_threshold(jnp.float32(1.0), 1), r"z: expected an array with at least one entry along its last axis, received shape \(\)"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
