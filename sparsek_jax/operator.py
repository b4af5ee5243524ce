"""The SPARSEK operator: the Euclidean projection onto the capped simplex.

``SPARSEK(z, k) = argmin_p ||p - z||^2  s.t.  0 <= p <= 1, sum(p) = k``, whose solution is
``p = clip(z - tau, 0, 1)`` with the threshold ``tau`` solving ``sum(clip(z - tau, 0, 1)) = k``.

How ``tau`` is found (see docs/operator.md): ``f(t) = sum_j clip(z_j - t, 0, 1)`` is continuous,
piecewise linear and non-increasing, with breakpoints at ``z_j`` and ``z_j - 1``. ``tau`` lies on the
linear piece that starts at the largest breakpoint ``b`` with ``f(b) > k``, found by binary searches over
the two sorted breakpoint lists in O(m log m), and is solved there in closed form. This yields the *smallest*
valid ``tau`` when the solution is not unique (a gap of at least one below the k-th largest score), which
keeps thresholds non-decreasing along growing prefixes.

The same routine (``threshold_of_sorted``) serves the dense operator here and the decoding cache
(``kv_cache.py``); the prefix thresholds (``thresholds.py``) track the same closed form along a sequence
(an event simulation over sorted lists), and the tests compare both against an independent bisection.
"""

from __future__ import annotations

import math
import numbers

import jax
import numpy as np
import jax.numpy as jnp
from jax import lax

__all__ = ["sparsek", "sparsek_threshold", "threshold_of_sorted"]


def threshold_of_sorted(z_desc: jax.Array, k) -> jax.Array:
    """Threshold of one vector already sorted in descending order.

    Args:
      z_desc: float32 ``[m]``, descending; invalid entries are ``-inf`` and come last.
      k: the budget, a positive scalar (may be traced).

    Returns:
      float32 scalar ``tau``; ``-inf`` when there are at most ``k`` valid entries (then every valid
      entry gets ``p = 1``).
    """
    valid = z_desc > -jnp.inf
    k = jnp.asarray(k, jnp.float32)
    z = jnp.where(valid, z_desc, 0.0)
    # Membership of U = {z - 1 > t} is decided on the very floats the breakpoints are made of:
    # testing z > t + 1 instead misplaces the key whose z - 1 *is* the breakpoint (rounding).
    minus_one = z - 1.0
    ascending = jnp.where(valid, -z, jnp.inf)  # searchsorted keys; invalid entries sort last
    ascending_minus_one = jnp.where(valid, -minus_one, jnp.inf)

    def count_above(x):  # #{valid z_j > x}
        return jnp.searchsorted(ascending, -x, side="left")

    def count_upper(x):  # #{valid z_j - 1 > x}
        return jnp.searchsorted(ascending_minus_one, -x, side="left")

    def f(t):  # sum_j clip(z_j - t, 0, 1): each term is clipped, so a flat stretch gives exactly k
        return jnp.sum(jnp.where(valid, jnp.clip(z - t, 0.0, 1.0), 0.0))

    # tau lies on the linear piece that starts at the largest breakpoint b with f(b) > k. The breakpoints
    # are two lists already sorted (z and z - 1, descending): one binary search in each, f evaluated
    # directly (O(m) per step, O(m log m) in all), and the larger of the two finds wins. No sort needed.
    lowest = jnp.min(jnp.where(valid, minus_one, jnp.inf)) - 1.0
    m = z.shape[0]

    def largest_above_k(breakpoints):  # breakpoints descending; f(b) grows along the list
        def bisect(_, bounds):
            lo, hi = bounds
            mid = (lo + hi) // 2
            above_k = f(breakpoints[jnp.minimum(mid, m - 1)]) > k
            return jnp.where(above_k, lo, mid + 1), jnp.where(above_k, mid, hi)

        first, _ = lax.fori_loop(0, int(m).bit_length(), bisect, (jnp.int32(0), jnp.int32(m)))
        return jnp.where(first < m, breakpoints[jnp.minimum(first, m - 1)], lowest)

    start = jnp.maximum(largest_above_k(jnp.where(valid, z, lowest)),
                        largest_above_k(jnp.where(valid, minus_one, lowest)))
    # On (start, next breakpoint]: U = {z - 1 > start} has p = 1, M = {z > start} \ U is fractional and
    # f(t) = f(start) - |M| (t - start). Solve, then one correction step that sums the fractional part
    # around the estimate (integer part first, so that a tau equal to a score comes out exactly).
    num_upper = count_upper(start)
    num_mid = count_above(start) - num_upper
    has_solution = jnp.sum(valid) > k
    safe_mid = jnp.where(has_solution & (num_mid > 0), num_mid, 1)
    tau = start + (f(start) - k) / safe_mid
    index = jnp.arange(z.shape[0])
    fractional = (index >= num_upper) & (index < num_upper + num_mid)
    tau = tau + ((num_upper - k) + jnp.sum(jnp.where(fractional, z - tau, 0.0))) / safe_mid
    return jnp.where(has_solution, tau, -jnp.inf)


def _masked(z, mask):
    z = jnp.asarray(z)
    z32 = z.astype(jnp.float32)
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask, bool), z.shape)
        z32 = jnp.where(mask, z32, -jnp.inf)
    return z32


def _check_budget(k):
    if isinstance(k, bool) or (isinstance(k, numbers.Number) and not isinstance(k, numbers.Real)):
        raise ValueError(f"k: expected a positive int or float, received {k!r}")
    if isinstance(k, numbers.Real) and not (k > 0 and math.isfinite(k)):
        raise ValueError(f"k: expected a positive int or float, received {k!r}")
    if not isinstance(k, numbers.Real) and not isinstance(k, jax.core.Tracer):
        values = np.asarray(k)
        if not np.issubdtype(values.dtype, np.number) or values.dtype == bool:
            raise ValueError(f"k: expected positive numbers, received an array of dtype {values.dtype}")
        bad = ~(np.isfinite(values) & (values > 0))
        if bad.any():
            raise ValueError(f"k: expected positive finite budgets, received {values[bad].ravel()[0].item()!r} "
                             f"({int(bad.sum())} of {values.size} entries)")


def _check_operand(z, mask):
    z = jnp.asarray(z) if not isinstance(z, jax.core.Tracer) else z
    if z.ndim < 1 or z.shape[-1] == 0:
        raise ValueError(f"z: expected an array with at least one entry along its last axis, received shape "
                         f"{z.shape}")
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"z: expected a floating-point array, received dtype {z.dtype}")
    if not isinstance(z, jax.core.Tracer) and bool(jnp.isnan(z).any()):
        raise ValueError(f"z: expected no NaN entries (mask entries out with mask=), received "
                         f"{int(jnp.isnan(z).sum())} NaN")
    if mask is not None:
        mask_shape = jnp.shape(mask)
        try:
            jnp.broadcast_shapes(mask_shape, z.shape)
        except ValueError:
            raise ValueError(f"mask: expected a bool array broadcastable to z's shape {z.shape}, "
                             f"received shape {mask_shape}") from None


@jax.jit
def _rowwise_threshold(z32, k):
    """Threshold along the last axis of float32 ``z32`` (``-inf`` marks invalid entries)."""
    lead = z32.shape[:-1]
    rows = z32.reshape(-1, z32.shape[-1])
    k_rows = jnp.broadcast_to(jnp.asarray(k, jnp.float32), lead).reshape(-1)
    z_desc = -jnp.sort(-rows, axis=-1)
    return jax.vmap(threshold_of_sorted)(z_desc, k_rows).reshape(lead)


def sparsek_threshold(z: jax.Array, k, *, mask: jax.Array | None = None) -> jax.Array:
    """The SPARSEK threshold ``tau`` along the last axis.

    Args:
      z: scores ``[..., m]``, any float dtype (computed in float32).
      k: budget, a positive int or float, or an array broadcastable to ``z.shape[:-1]``.
      mask: optional bool ``[..., m]`` (broadcastable to ``z``); ``False`` entries do not take part.

    Returns:
      float32 ``[...]``: the smallest ``tau`` with ``sum(clip(z - tau, 0, 1)) = k`` over valid entries;
      ``-inf`` where there are at most ``k`` valid entries.
    """
    _check_budget(k)
    _check_operand(z, mask)
    z32 = _masked(z, mask)
    return jnp.where(_invalid_rows(z32, k), jnp.nan, _rowwise_threshold(z32, k))


def _invalid_rows(z32, k):
    """Rows whose budget is not a positive finite number or that hold a NaN score: under a trace they cannot
    be rejected, so their output is NaN (never silently zeros or ones)."""
    k = jnp.asarray(k, jnp.float32)
    return ~(jnp.isfinite(k) & (k > 0)) | jnp.any(jnp.isnan(z32), axis=-1)


@jax.custom_vjp
def _sparsek(z32, k):
    tau = _rowwise_threshold(z32, k)
    p = jnp.where(z32 > -jnp.inf, jnp.clip(z32 - tau[..., None], 0.0, 1.0), 0.0)
    return jnp.where(_invalid_rows(z32, k)[..., None], jnp.nan, p)


def _sparsek_fwd(z32, k):
    p = _sparsek(z32, k)
    return p, p


def _sparsek_bwd(residuals, g):
    p = residuals
    # Only the fractional entries M = {0 < p < 1} move with z; tau moves by mean_M(dz).
    fractional = (p > 0.0) & (p < 1.0)
    count = jnp.sum(fractional, axis=-1, keepdims=True)
    mean = jnp.sum(jnp.where(fractional, g, 0.0), axis=-1, keepdims=True) / jnp.maximum(count, 1)
    dz = jnp.where(fractional, g - mean, 0.0)
    # d tau / d k = -1 / |M|, so dp_j / dk = 1 / |M| on M.
    dk = jnp.where(count[..., 0] > 0, mean[..., 0], 0.0)
    return dz, dk


_sparsek.defvjp(_sparsek_fwd, _sparsek_bwd)


def sparsek(z: jax.Array, k, *, mask: jax.Array | None = None) -> jax.Array:
    """SPARSEK(z, k): projection of ``z`` onto ``{p : 0 <= p <= 1, sum(p) = k}`` along the last axis.

    ``k = 1`` gives sparsemax. Where there are at most ``k`` valid entries, every valid entry gets 1.

    Args:
      z: scores ``[..., m]``, any float dtype (computed in float32).
      k: budget, a positive int or float, or an array broadcastable to ``z.shape[:-1]``.
      mask: optional bool ``[..., m]``; invalid entries get ``p = 0`` and do not count.

    Returns:
      ``p`` with ``z``'s shape and dtype. Differentiable with a custom VJP:
      ``dz_j = [j in M] (g_j - mean_{l in M} g_l)`` with ``M = {0 < p < 1}``.
    """
    _check_budget(k)
    _check_operand(z, mask)
    z = jnp.asarray(z)
    # k has one value per row inside, so its cotangent is per row and broadcasting sums it back.
    k_rows = jnp.broadcast_to(jnp.asarray(k, jnp.float32), z.shape[:-1])
    p = _sparsek(_masked(z, mask), k_rows)
    return p.astype(z.dtype)
