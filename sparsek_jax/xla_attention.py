"""The blocked SparseK attention in plain XLA (``implementation="xla"``): linear memory and time, any backend.

For a block of ``B`` consecutive queries starting at ``i0`` every key any of them attends to lies in one
gathered tile of ``window + B - 1 + topk`` keys: the contiguous range ``(i0 - window, i0 + B - 1]`` (the
block's windows plus the ``B - 1`` candidates that enter after ``i0``) and the anchors, the keys selected by
the block's first query (docs/xla_attention.md says why that suffices). Masks and gates are rebuilt per
(query, tile slot) by the rule every path shares (``sparsek_kernels.common.pair_gates``), one softmax per query.
Memory and time are ``O(batch * heads * seq * (window + B + topk))``; no ``seq x seq`` array exists.

``forward`` and ``backward`` have the signatures of the kernels' adapters (``sparsek_kernels.gpu``), so that
the custom VJP in ``sparsek_jax.blocked`` drives every implementation the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparsek_jax.softmax import masked_softmax
from sparsek_kernels import common, layout

__all__ = ["Options", "forward", "backward"]


class Options(NamedTuple):
    window: int
    gate: str
    scale: float
    block_q: int


class _Tiles(NamedTuple):
    """Per query block: gathered keys and everything needed to rebuild masks and gates."""

    q: jax.Array           # [b, hkv, nb, B, G, d] float32
    k: jax.Array           # [b, hkv, nb, L, d] float32
    v: jax.Array           # [b, hkv, nb, L, d] float32
    key_pos: jax.Array     # [b, hkv, nb, L] int32, -1 where the slot is empty
    allowed: jax.Array     # [b, hkv, nb, B, 1, L] bool: window or selected
    gates: jax.Array       # [b, hkv, nb, B, 1, L] float32: 1 on the window, clip(u - tau, 0, 1) on selected
    fractional: jax.Array  # [b, hkv, nb, B, 1, L] bool: selected with 0 < u - tau < 1 (the gate moves)


def _query_blocks(x, num_blocks, block_q, kv_heads):
    """Per query head ``[b, seq, hq, ...]`` -> ``[b, hkv, nb, B, G, ...]`` float32."""
    b, _, hq = x.shape[:3]
    x = layout.blocks(x.astype(jnp.float32), num_blocks, block_q)
    x = x.reshape((b, num_blocks, block_q, kv_heads, hq // kv_heads) + x.shape[4:])
    return jnp.moveaxis(x, 3, 1)


def _per_query(x, num_blocks, block_q, fill):
    """Per query and KV head ``[b, seq, hkv]`` -> ``[b, hkv, nb, B, 1, 1]``."""
    return jnp.moveaxis(layout.blocks(x, num_blocks, block_q, fill), 3, 1)[..., None, None]


def _build_tiles(q, k, v, scores, segments, sel: layout.Selection, o: Options) -> _Tiles:
    batch, seq, _, _ = q.shape
    kv_heads = k.shape[2]
    B, w = o.block_q, o.window
    nb = -(-seq // B)
    contiguous = (jnp.arange(nb, dtype=jnp.int32)[:, None] * B - w + 1
                  + jnp.arange(w + B - 1, dtype=jnp.int32)[None, :])  # [nb, w + B - 1]
    key_pos = jnp.concatenate([jnp.broadcast_to(contiguous, (batch, kv_heads) + contiguous.shape), sel.anchors],
                              axis=-1)
    key_valid = (key_pos >= 0) & (key_pos < seq)
    safe_pos = jnp.where(key_valid, key_pos, 0)
    gather = lambda x: layout.gather_rows(x, safe_pos)
    key_seg = jnp.broadcast_to(segments[:, :, None], scores.shape)
    per_key = lambda x: x[:, :, :, None, None, :]  # [b, hkv, nb, L] -> [b, hkv, nb, 1, 1, L]
    i = jnp.arange(nb * B, dtype=jnp.int32).reshape(nb, B)[None, None, :, :, None, None]
    q_seg = _per_query(jnp.broadcast_to(segments[:, :, None], scores.shape), nb, B, -1)
    rows = (i, q_seg, _per_query(sel.tau, nb, B, jnp.inf), _per_query(sel.theta, nb, B, jnp.inf),
            _per_query(sel.theta_pos, nb, B, seq))
    allowed, gates, fractional = common.pair_gates(*rows, per_key(key_pos), per_key(gather(scores)),
                                                per_key(gather(key_seg)), per_key(key_valid), window=w, seq=seq)
    return _Tiles(_query_blocks(q, nb, B, kv_heads), gather(k.astype(jnp.float32)), gather(v.astype(jnp.float32)),
                  key_pos, allowed, gates, fractional)


def _logits(t: _Tiles, o: Options):
    s = jnp.einsum("zhcbgd,zhcld->zhcbgl", t.q, t.k) * o.scale
    return common.gated_logits(s, t.allowed, t.gates, gate_mode=o.gate)


def _unblock(x, seq):
    """``[b, hkv, nb, B, G, ...] -> [b, seq, hkv * G, ...]``."""
    b, h, nb, B, g = x.shape[:5]
    x = jnp.moveaxis(x, 1, 3)  # [b, nb, B, hkv, G, ...]
    return x.reshape((b, nb * B, h * g) + x.shape[5:])[:, :seq]


def forward(q, k, v, scores, segments, sel: layout.Selection, o: Options):
    """Output ``[b, seq, hq, d]`` and log-sum-exp ``[b, seq, hq]``, float32 (see ``sparsek_kernels.gpu``)."""
    with jax.named_scope("build_tiles"):
        t = _build_tiles(q, k, v, scores, segments, sel, o)
    with jax.named_scope("tile_attention"):
        probs, lse = masked_softmax(_logits(t, o), t.allowed)
        if o.gate == "value":
            probs = probs * t.gates
        out = jnp.einsum("zhcbgl,zhcld->zhcbgd", probs, t.v)
    seq = q.shape[1]
    return _unblock(out, seq), _unblock(lse, seq)


def backward(q, k, v, scores, segments, sel: layout.Selection, out, lse, d_out, o: Options):
    """``dq``, ``dk``, ``dv`` and the two per-KV-head terms of the scores' gradient, as the kernels' adapters
    return them (``sparsek_kernels.gpu.attention_backward``)."""
    batch, seq, _, _ = q.shape
    kv_heads = k.shape[2]
    nb = -(-seq // o.block_q)
    with jax.named_scope("build_tiles"):
        t = _build_tiles(q, k, v, scores, segments, sel, o)
    with jax.named_scope("tile_gradients"):
        blocked = lambda x: _query_blocks(x, nb, o.block_q, kv_heads)
        do = blocked(d_out)
        probs = jnp.exp(_logits(t, o) - blocked(lse)[..., None])  # 0 off the pattern
        do_v = jnp.einsum("zhcbgd,zhcld->zhcbgl", do, t.v)
        delta = jnp.sum(do * blocked(out), axis=-1, keepdims=True)  # D_i = dO_i . o_i
        d_logits, d_gates = common.score_gradients(probs, do_v, delta, t.gates, t.fractional, o.gate)
        weights = probs * t.gates if o.gate == "value" else probs
        dq = jnp.einsum("zhcbgl,zhcld->zhcbgd", d_logits, t.k) * o.scale
        dk_tile = jnp.einsum("zhcbgl,zhcbgd->zhcld", d_logits, t.q) * o.scale
        dv_tile = jnp.einsum("zhcbgl,zhcbgd->zhcld", weights, do)
        d_gates = jnp.sum(d_gates, axis=4)  # [b, hkv, nb, B, L]: the group's heads share the gates
    with jax.named_scope("key_gradient_sums"):
        dk, dv, direct = (layout.scatter_add(x, t.key_pos, seq)
                          for x in (dk_tile, dv_tile, jnp.sum(d_gates, axis=3)))
    gsum = jnp.moveaxis(jnp.sum(d_gates, axis=4), 1, 3).reshape(batch, -1, kv_heads)[:, :seq]
    return _unblock(dq, seq), dk, dv, direct, gsum
