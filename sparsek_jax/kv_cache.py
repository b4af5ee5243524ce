"""Constant-size KV cache for decoding: a sliding-window ring buffer plus the live top-k keys.

One layout serves the three attention kinds (one implementation with parameters):

- ``sparsek``: a ring of ``window`` slots plus ``topk`` selected keys (with K/V) and ``extra`` scores;
- ``sliding``: a ring of ``window`` slots, nothing selected;
- ``dense``: a ring of ``max_length`` slots (it never wraps while the sequence fits), nothing selected.

Why this is exact for SparseK: the candidates of the next query are the keys older than
the window, a set that only grows, so its top-k by ``(score, position)`` only changes by a newcomer
displacing the weakest selected key, and a displaced key never returns. Its K/V can be dropped at once.
Keys ranked ``topk + 1 .. topk + extra`` can never be selected again either, but their scores still move
``tau`` while they lie above it, so their scores alone are kept. ``tau`` is exact while the largest score
ever dropped is ``<= tau``; the cache tracks that (``exact``), as ``prefix_thresholds`` does.
All arrays have shapes fixed at creation: memory does not grow with the context length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sparsek_jax.operator import threshold_of_sorted
from sparsek_jax.softmax import masked_softmax
from sparsek_kernels.common import TINY

__all__ = ["AttentionCache", "empty_cache", "prefill_cache", "append_token", "attend"]


class AttentionCache(NamedTuple):
    """Decoding state of one attention layer (a pytree of arrays).

    window_k, window_v: ``[batch, ring, kv_heads, head_dim]``; slot ``p % ring`` holds position ``p``.
    window_u: ``[batch, ring, kv_heads]`` float32 scores of the ring's keys (they become candidates later).
    window_pos: ``[ring]`` int32 position held by each slot, -1 if empty.
    selected_k, selected_v: ``[batch, kv_heads, topk, head_dim]``: the live top-k among older keys.
    selected_u: ``[batch, kv_heads, topk]`` float32, ``-inf`` in empty slots.
    selected_pos: ``[batch, kv_heads, topk]`` int32, -1 in empty slots.
    extra_u: ``[batch, kv_heads, extra]`` float32: the next best scores (only ``tau`` needs them).
    dropped: ``[batch, kv_heads]`` float32: the largest score dropped from the buffer so far.
    exact: ``[batch, kv_heads]`` bool: ``tau`` was exact at every step so far.
    length: int32 scalar: the number of tokens processed.
    """

    window_k: jax.Array
    window_v: jax.Array
    window_u: jax.Array
    window_pos: jax.Array
    selected_k: jax.Array
    selected_v: jax.Array
    selected_u: jax.Array
    selected_pos: jax.Array
    extra_u: jax.Array
    dropped: jax.Array
    exact: jax.Array
    length: jax.Array

    @property
    def ring(self) -> int:
        return self.window_pos.shape[0]

    @property
    def topk(self) -> int:
        return self.selected_pos.shape[-1]


def empty_cache(batch: int, *, ring: int, topk: int, extra: int, kv_heads: int, head_dim: int,
                dtype=jnp.float32) -> AttentionCache:
    """An empty cache. ``ring``: window slots (``window`` for sparsek/sliding, max length for dense)."""
    return AttentionCache(
        window_k=jnp.zeros((batch, ring, kv_heads, head_dim), dtype),
        window_v=jnp.zeros((batch, ring, kv_heads, head_dim), dtype),
        window_u=jnp.full((batch, ring, kv_heads), -jnp.inf, jnp.float32),
        window_pos=jnp.full((ring,), -1, jnp.int32),
        selected_k=jnp.zeros((batch, kv_heads, topk, head_dim), dtype),
        selected_v=jnp.zeros((batch, kv_heads, topk, head_dim), dtype),
        selected_u=jnp.full((batch, kv_heads, topk), -jnp.inf, jnp.float32),
        selected_pos=jnp.full((batch, kv_heads, topk), -1, jnp.int32),
        extra_u=jnp.full((batch, kv_heads, extra), -jnp.inf, jnp.float32),
        dropped=jnp.full((batch, kv_heads), -jnp.inf, jnp.float32),
        exact=jnp.ones((batch, kv_heads), bool),
        length=jnp.zeros((), jnp.int32),
    )


def prefill_cache(cache: AttentionCache, k, v, scores=None) -> AttentionCache:
    """The cache after a prompt, from the prompt's keys ``[batch, n, kv_heads, head_dim]``, values and scores
    ``[batch, n, kv_heads]`` (``None`` when the layer selects nothing). ``cache`` gives the sizes and must be
    empty: prefill starts a sequence."""
    batch, n, kv_heads, _ = k.shape
    ring, topk, extra = cache.ring, cache.topk, cache.extra_u.shape[-1]
    positions = jnp.arange(n, dtype=jnp.int32)
    in_ring = positions >= n - ring
    slots = jnp.where(in_ring, positions % max(ring, 1), ring)  # out-of-range slot: dropped by the scatter
    window_k = cache.window_k.at[:, slots].set(k.astype(cache.window_k.dtype), mode="drop")
    window_v = cache.window_v.at[:, slots].set(v.astype(cache.window_v.dtype), mode="drop")
    window_pos = cache.window_pos.at[slots].set(positions, mode="drop")
    window_u = cache.window_u
    if scores is not None:
        window_u = window_u.at[:, slots].set(scores.astype(jnp.float32), mode="drop")
    cache = cache._replace(window_k=window_k, window_v=window_v, window_u=window_u, window_pos=window_pos,
                           length=jnp.asarray(n, jnp.int32))
    if topk == 0 or scores is None:
        return cache
    # Candidates of the next query: keys older than the ring. Rank by (score, position), newest first.
    u = jnp.moveaxis(scores.astype(jnp.float32), 1, 2)  # [batch, kv_heads, n]
    u = jnp.where(in_ring, -jnp.inf, u)
    pos = jnp.broadcast_to(jnp.where(in_ring, -1, positions), u.shape)
    neg_u, neg_pos = lax.sort((-u, -pos), dimension=-1, num_keys=2)
    ranked_u, ranked_pos = -neg_u, -neg_pos
    width = topk + extra + 1
    if n < width:
        ranked_u = jnp.pad(ranked_u, [(0, 0), (0, 0), (0, width - n)], constant_values=-jnp.inf)
        ranked_pos = jnp.pad(ranked_pos, [(0, 0), (0, 0), (0, width - n)], constant_values=-1)
    sel_pos = ranked_pos[..., :topk]
    gather = lambda x: jnp.take_along_axis(jnp.moveaxis(x, 1, 2), jnp.maximum(sel_pos, 0)[..., None], axis=2)
    return cache._replace(
        selected_k=gather(k).astype(cache.selected_k.dtype),
        selected_v=gather(v).astype(cache.selected_v.dtype),
        selected_u=ranked_u[..., :topk],
        selected_pos=sel_pos,
        extra_u=ranked_u[..., topk:topk + extra],
        dropped=jnp.max(ranked_u[..., topk + extra:], axis=-1),
    )


def _insert_candidate(cache: AttentionCache, k, v, u, pos, valid) -> AttentionCache:
    """Offers one key per (batch, kv head) to the candidate buffer. k, v [batch, kv_heads, d]; u [batch,
    kv_heads]; pos, valid: scalars."""
    if cache.topk == 0:
        return cache
    u = jnp.where(valid, u, -jnp.inf)
    # The weakest selected key by (score, position); empty slots (-inf, -1) are the weakest of all.
    weakest = jnp.argmin(jnp.where(cache.selected_u == cache.selected_u.min(-1, keepdims=True),
                                   cache.selected_pos, jnp.iinfo(jnp.int32).max), axis=-1)
    weak_u = jnp.take_along_axis(cache.selected_u, weakest[..., None], -1)[..., 0]
    weak_pos = jnp.take_along_axis(cache.selected_pos, weakest[..., None], -1)[..., 0]
    enters = valid & ((u > weak_u) | ((u == weak_u) & (pos > weak_pos)))  # [batch, kv_heads]
    one_hot = (jnp.arange(cache.topk) == weakest[..., None]) & enters[..., None]
    selected_k = jnp.where(one_hot[..., None], k[:, :, None, :].astype(cache.selected_k.dtype), cache.selected_k)
    selected_v = jnp.where(one_hot[..., None], v[:, :, None, :].astype(cache.selected_v.dtype), cache.selected_v)
    selected_u = jnp.where(one_hot, u[..., None], cache.selected_u)
    selected_pos = jnp.where(one_hot, pos, cache.selected_pos)
    # The loser (the newcomer, or the key it displaced) keeps only its score, if it beats the weakest extra.
    loser = jnp.where(enters, weak_u, u)
    dropped = cache.dropped
    extra_u = cache.extra_u
    if extra_u.shape[-1]:
        slot = jnp.argmin(extra_u, axis=-1)
        smallest = jnp.take_along_axis(extra_u, slot[..., None], -1)[..., 0]
        replace = loser > smallest
        extra_u = jnp.where((jnp.arange(extra_u.shape[-1]) == slot[..., None]) & replace[..., None],
                            loser[..., None], extra_u)
        loser = jnp.where(replace, smallest, loser)
    dropped = jnp.maximum(dropped, loser)
    return cache._replace(selected_k=selected_k, selected_v=selected_v, selected_u=selected_u,
                          selected_pos=selected_pos, extra_u=extra_u, dropped=dropped)


def append_token(cache: AttentionCache, k, v, u=None) -> AttentionCache:
    """Adds the next token (position ``cache.length``): k, v ``[batch, kv_heads, head_dim]``, u ``[batch,
    kv_heads]`` or None. The key leaving the ring becomes a candidate (with no ring, the new key itself)."""
    position = cache.length
    if u is None:
        u = jnp.full(k.shape[:2], -jnp.inf, jnp.float32)
    u = u.astype(jnp.float32)
    if cache.ring == 0:
        cache = _insert_candidate(cache, k, v, u, position, jnp.asarray(True))
    else:
        slot = position % cache.ring
        leaving = cache.window_pos[slot]
        cache = _insert_candidate(cache, cache.window_k[:, slot], cache.window_v[:, slot], cache.window_u[:, slot],
                                  leaving, leaving >= 0)
        cache = cache._replace(
            window_k=cache.window_k.at[:, slot].set(k.astype(cache.window_k.dtype)),
            window_v=cache.window_v.at[:, slot].set(v.astype(cache.window_v.dtype)),
            window_u=cache.window_u.at[:, slot].set(u),
            window_pos=cache.window_pos.at[slot].set(position))
    return cache._replace(length=position + 1)


def selection_threshold(cache: AttentionCache):
    """``tau`` of the current candidates ``[batch, kv_heads]`` (``-inf`` while at most topk exist)."""
    scores = jnp.concatenate([cache.selected_u, cache.extra_u], axis=-1)
    ranked = -jnp.sort(-scores, axis=-1)
    flat = ranked.reshape(-1, ranked.shape[-1])
    return jax.vmap(threshold_of_sorted, in_axes=(0, None))(flat, cache.topk).reshape(ranked.shape[:-1])


def attend(cache: AttentionCache, q, *, scale: float, gate: str = "value"):
    """Attention of the newest query ``q`` ``[batch, q_heads, head_dim]`` over the cache (after
    ``append_token``). Returns ``(out [batch, q_heads, head_dim], cache)`` with ``exact`` updated."""
    batch, q_heads, head_dim = q.shape
    kv_heads = cache.window_k.shape[2]
    group = q_heads // kv_heads
    qg = q.astype(jnp.float32).reshape(batch, kv_heads, group, head_dim)
    window_logits = jnp.einsum("bhgd,bshd->bhgs", qg, cache.window_k.astype(jnp.float32)) * scale
    logits = [window_logits]
    allowed = [jnp.broadcast_to(cache.window_pos >= 0, window_logits.shape)]
    values = [jnp.moveaxis(cache.window_v.astype(jnp.float32), 1, 2)]  # [b, kv_heads, ring, d]
    gates = [jnp.ones(window_logits.shape[:2] + window_logits.shape[3:], jnp.float32)]
    if cache.topk:
        tau = selection_threshold(cache)
        gate_values = jnp.where(cache.selected_pos >= 0,
                                jnp.clip(cache.selected_u - tau[..., None], 0.0, 1.0), 0.0)
        sel_logits = jnp.einsum("bhgd,bhkd->bhgk", qg, cache.selected_k.astype(jnp.float32)) * scale
        if gate == "logit":
            sel_logits = sel_logits + jnp.log(jnp.maximum(gate_values, TINY))[:, :, None]
        logits.append(sel_logits)
        allowed.append(jnp.broadcast_to((cache.selected_pos >= 0)[:, :, None], sel_logits.shape))
        values.append(cache.selected_v.astype(jnp.float32))
        gates.append(gate_values if gate == "value" else jnp.ones_like(gate_values))
        cache = cache._replace(exact=cache.exact & (cache.dropped <= tau))
    probs, _ = masked_softmax(jnp.concatenate(logits, axis=-1), jnp.concatenate(allowed, axis=-1))
    probs = probs * jnp.concatenate(gates, axis=-1)[:, :, None]
    out = jnp.einsum("bhgs,bhsd->bhgd", probs, jnp.concatenate(values, axis=2))
    return out.reshape(batch, q_heads, head_dim).astype(q.dtype), cache
