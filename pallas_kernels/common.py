"""Math shared by the GPU and TPU kernels: the SparseK pattern, logits and score gradients of a chunk.

Every function works on 2-D blocks that broadcast to ``[rows, keys]``: per-row values shaped ``[rows, 1]``,
per-key values ``[1, keys]``. Pure ``jnp`` on loaded values, so the same code lowers through Triton and Mosaic.
"""

from __future__ import annotations

import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
TINY = float(jnp.finfo(jnp.float32).tiny)


def pattern(i, q_seg, tau, theta, theta_pos, j, u_j, seg_j, valid_j, *, window, seq):
    """Allowed pairs, gates and the fractional (gate-moving) pairs of rows x keys.

    Per row (``[rows, 1]``): query position, document, ``tau``, ``theta``, ``theta_pos``; per key
    (``[1, keys]``): position, score, document, validity. Selection uses the newer-wins tie rule.
    """
    same = valid_j & (seg_j == q_seg) & (i < seq)
    in_window = same & (j <= i) & (j > i - window)
    selected = same & (j <= i - window) & ((u_j > theta) | ((u_j == theta) & (j >= theta_pos)))
    gap = u_j - tau
    gates = jnp.where(in_window, 1.0, jnp.where(selected, jnp.clip(gap, 0.0, 1.0), 0.0))
    fractional = selected & (gap > 0.0) & (gap < 1.0)
    return in_window | selected, gates, fractional


def logits(q, k, allowed, gates, *, scale, gate_mode):
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    if gate_mode == "logit":
        s = s + jnp.log(jnp.maximum(gates, TINY))
    return jnp.where(allowed, s, MASK_VALUE)


def score_gradients(p, dp, delta, gates, fractional, gate_mode):
    """dS (gradient of the logits) and G (gradient of the gates, on fractional pairs) of a chunk; ``delta``
    is ``D_i = dO_i . o_i`` per row (``[rows, 1]``)."""
    if gate_mode == "value":  # o = sum_j P_ij g_ij v_j
        ds = p * (gates * dp - delta)
        g = p * dp
    else:
        ds = p * (dp - delta)
        g = ds / jnp.where(fractional, gates, 1.0) if gate_mode == "logit" else jnp.zeros_like(ds)
    return ds, jnp.where(fractional, g, 0.0)


