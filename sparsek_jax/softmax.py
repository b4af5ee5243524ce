"""The softmax over each query's allowed keys, with rows that allow no key at all."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_softmax(logits, allowed, axis: int = -1):
    """Softmax of ``logits`` along ``axis`` over the entries where ``allowed``; returns ``(probs, lse)``.

    A row with no allowed entry gets probabilities 0 (its query outputs zeros) and log-sum-exp 0, so nothing
    is NaN and ``exp(logits - lse)`` recovers the probabilities of every other row.
    """
    logits = jnp.where(allowed, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=axis, keepdims=True)
    # The softmax does not depend on the shift, so it carries no gradient; differentiating through the max of a
    # row holding -inf made NaN under some compilations (LLVM -O0 on CPU).
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    weights = jnp.where(allowed, jnp.exp(logits - row_max), 0.0)
    total = jnp.sum(weights, axis=axis, keepdims=True)
    has_keys = total > 0
    safe_total = jnp.where(has_keys, total, 1.0)
    lse = jnp.where(has_keys, row_max + jnp.log(safe_total), 0.0)
    return weights / safe_total, jnp.squeeze(lse, axis)
