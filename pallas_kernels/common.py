"""Rules and math written once for every path: the selection rule, the gates of (query, key) pairs, logits and score gradients of a
chunk of (query, key) pairs, and a binary search that lowers in Triton and Mosaic.

Every function is pure ``jnp`` on loaded values and broadcasts: the kernels call it on ``[rows, keys]`` blocks
(per-row values ``[rows, 1]``, per-key values ``[1, keys]``), the XLA path on whole batched tiles.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
TINY = float(jnp.finfo(jnp.float32).tiny)


def is_selected(scores_j, pos_j, theta_i, theta_pos_i):
    """``(u_j, j) >= (theta_i, theta_pos_i)``: the selection rule, among equal scores the newer key first."""
    return (scores_j > theta_i) | ((scores_j == theta_i) & (pos_j >= theta_pos_i))


def pair_gates(i, q_seg, tau, theta, theta_pos, j, u_j, seg_j, valid_j, *, window, seq):
    """Allowed pairs, gates and the fractional (gate-moving) pairs of queries x keys.

    Per query: position, document, ``tau``, ``theta``, ``theta_pos``; per key: position, score, document,
    validity. Window keys ``i - window < j <= i`` have gate 1; selected candidates (``j <= i - window``,
    ``is_selected``) have gate ``clip(u_j - tau_i, 0, 1)``; nothing crosses documents.
    """
    same = valid_j & (seg_j == q_seg) & (i < seq)
    in_window = same & (j <= i) & (j > i - window)
    selected = same & (j <= i - window) & is_selected(u_j, j, theta, theta_pos)
    gap = u_j - tau
    gates = jnp.where(in_window, 1.0, jnp.where(selected, jnp.clip(gap, 0.0, 1.0), 0.0))
    fractional = selected & (gap > 0.0) & (gap < 1.0)
    return in_window | selected, gates, fractional


def gated_logits(s, allowed, gates, *, gate_mode):
    """Logits ``s`` (already scaled) with the log-gates added for ``gate_mode="logit"``, masked off the pattern.
    Selected gates are positive (the top-k lie inside the SPARSEK support); the floor only guards log(0)."""
    if gate_mode == "logit":
        s = s + jnp.log(jnp.maximum(gates, TINY))
    return jnp.where(allowed, s, MASK_VALUE)


def logits(q, k, allowed, gates, *, scale, gate_mode):
    """``gated_logits`` of a ``[rows, d] x [keys, d]`` tile."""
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    return gated_logits(s, allowed, gates, gate_mode=gate_mode)


def score_gradients(p, dp, delta, gates, fractional, gate_mode):
    """dS (gradient of the logits) and G (gradient of the gates, on fractional pairs) from the probabilities
    ``p``, ``dp = dO . v`` and ``delta`` = ``D_i = dO_i . o_i`` (per query, broadcasting)."""
    if gate_mode == "value":  # o = sum_j P_ij g_ij v_j
        ds = p * (gates * dp - delta)
        g = p * dp
    else:
        ds = p * (dp - delta)
        g = ds / jnp.where(fractional, gates, 1.0) if gate_mode == "logit" else jnp.zeros_like(ds)
    return ds, jnp.where(fractional, g, 0.0)


def count_leading(predicate, lo, hi, num_steps: int):
    """The first index of ``[lo, hi)`` where ``predicate`` fails (``hi`` if it never does), for a predicate that
    holds on a prefix of the range. Vectorised over the shapes of ``lo`` and ``hi``; ``num_steps`` must be at
    least the bit length of the longest range. ``predicate`` only sees indices of the initial range (clamped),
    so it may gather with them. A rolled loop of ``num_steps`` steps: the program does not grow with the range."""
    first, last = lo, jnp.maximum(hi - 1, lo)

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        holds = predicate(jnp.clip(mid, first, last)) & (mid < hi)
        return jnp.where(holds, mid + 1, lo), jnp.where(holds, hi, mid)

    return lax.fori_loop(0, num_steps, step, (lo, hi))[0]
