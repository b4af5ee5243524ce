"""The dense SparseK attention pattern: which keys each query attends to, and with which gate.

O(seq^2) in memory and time. It is the definition every fast path is tested against and the source of the
plots in the docs. It ranks each query's candidates with its own sort and gates them with the operator, so it
shares with the blocked thresholds (``thresholds.py``) only the selection rule (``is_selected``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sparsek_jax import validation
from sparsek_jax.operator import sparsek
from sparsek_jax.thresholds import document_index
from sparsek_kernels.common import is_selected

__all__ = ["AttentionPattern", "attention_pattern"]


class AttentionPattern(NamedTuple):
    """Dense pattern, every field ``[batch, kv_heads, seq_q, seq_k]``.

    window: bool, key in the query's sliding window (``i - window < j <= i``, same document).
    selected: bool, key among the query's top-``topk`` candidates (``j <= i - window``, same document).
    gates: float32, 1 on the window, ``clip(u_j - tau_i, 0, 1)`` on selected keys, 0 elsewhere.
      Differentiable with respect to the scores through the SPARSEK VJP.
    """

    window: jax.Array
    selected: jax.Array
    gates: jax.Array


def attention_pattern(scores: jax.Array, *, topk: int, window: int,
                      segment_ids: jax.Array | None = None) -> AttentionPattern:
    """Dense SparseK pattern of ``scores`` ``[batch, seq, kv_heads]`` (see ``AttentionPattern``).

    Meant for small ``seq`` (tests, plots, the reference implementation).
    """
    topk, window = validation.check_selection_args(scores, topk, window, segment_ids)
    return _dense_pattern(jnp.asarray(scores), None if segment_ids is None else jnp.asarray(segment_ids),
                          topk=topk, window=window)


# One program per (shapes, topk, window): called eagerly, its few dozen operations would each compile alone.
@functools.partial(jax.jit, static_argnames=("topk", "window"))
def _dense_pattern(scores, segment_ids, *, topk: int, window: int) -> AttentionPattern:
    batch, seq, kv_heads = scores.shape
    u = jnp.moveaxis(scores.astype(jnp.float32), 2, 1)[:, :, None, :]  # [batch, kv_heads, 1, seq_k]
    i = jnp.arange(seq)[:, None]
    j = jnp.arange(seq)[None, :]
    same_doc = jnp.ones((batch, 1, seq, seq), bool)
    if segment_ids is not None:
        docs = document_index(segment_ids)
        same_doc = (docs[:, :, None] == docs[:, None, :])[:, None]
    in_window = same_doc & (j <= i) & (j > i - window)
    candidate = same_doc & (j <= i - window)
    candidate = jnp.broadcast_to(candidate, (batch, kv_heads, seq, seq))
    in_window = jnp.broadcast_to(in_window, (batch, kv_heads, seq, seq))
    u_rows = jnp.broadcast_to(u, candidate.shape)
    if topk == 0:
        selected = jnp.zeros_like(candidate)
        gates = jnp.zeros(candidate.shape, jnp.float32)
    else:
        # Rank candidates by (score, position), newest first among ties; the topk-th is (theta, theta_pos).
        positions = jnp.broadcast_to(j, candidate.shape).astype(jnp.int32)
        neg_scores, neg_pos = lax.sort((jnp.where(candidate, -u_rows, jnp.inf),
                                        jnp.where(candidate, -positions, 1)), dimension=-1, num_keys=2)
        count = jnp.sum(candidate, axis=-1)
        kth = min(topk, seq) - 1
        has_cut = count > topk
        theta = jnp.where(has_cut, -neg_scores[..., kth], -jnp.inf)[..., None]
        theta_pos = jnp.where(has_cut, -neg_pos[..., kth], -1)[..., None]
        selected = candidate & is_selected(lax.stop_gradient(u_rows), positions, theta, theta_pos)
        gates = jnp.where(selected, sparsek(u_rows, topk, mask=candidate), 0.0)
    gates = jnp.where(in_window, 1.0, gates)
    gates = jnp.where(validation.nonfinite_rows(scores)[:, :, None, None], jnp.nan, gates)
    return AttentionPattern(in_window, selected, gates)
