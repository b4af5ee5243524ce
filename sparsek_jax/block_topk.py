"""Query-dependent block top-k attention (MoBA / NSA style): a prior sparse-attention baseline to compare
SparseK against.

Query ``i`` attends with one softmax to its sliding window ``W_i = {j : i - window < j <= i}`` and to the keys
of the blocks it selects among its candidates ``C_i = {j : j <= i - window}``, both within ``i``'s document:

- keys are cut into fixed blocks of ``B = block_size`` positions, block ``b`` holding positions
  ``[b B, (b + 1) B)``; block ``b`` is *eligible* for query ``i`` when it holds at least one candidate of ``i``;
- its pooled key is the mean of ``k_j`` over the candidates of ``i`` inside it (a block that straddles the
  window boundary or a document start is pooled over its candidate part only, so pooled keys never look at
  the window, the future or another document);
- each query head scores the eligible blocks by ``scale * q_i . pooled_b`` and selects the
  ``n = topk // block_size`` best (equal float32 scores: lower block index first, as ``lax.top_k``; all of
  them when fewer are eligible). Its selected keys are its candidates inside those blocks: at most ``n B <= topk`` keys;
- no gates: a plain softmax over ``W_i`` and the selected keys, output ``sum_j p_ij v_j``. A query with no key
  at all outputs zeros.

The selection is not differentiated (the block scores are computed from ``stop_gradient`` inputs); gradients
reach ``q``, ``k`` and ``v`` through the attention weights. Unlike SparseK (``sparsek_attention``), which ranks
keys by a learned per-key score shared by all queries of a KV head and gates them, the selection here depends
on the query (each query head of a GQA group selects its own blocks) and is hard.

Special cases: ``topk < block_size`` is the sliding window of ``window`` keys; ``topk >= block_size *
ceil(seq / block_size)`` (``topk >= seq`` when ``block_size`` divides ``seq``) is dense causal attention,
whatever the window; ``block_size = 1`` is per-key query-dependent top-``topk``.

``implementation="xla"`` never builds a ``seq x seq`` array: the block scores come from prefix sums of ``k``
within each block, ``O(seq * num_blocks * head_dim)`` work; then ``lax.top_k`` over blocks, a gather of the
selected blocks' keys and of the window per query, and one masked softmax: memory
``O(batch * q_heads * seq * (num_blocks + (topk + window) * head_dim))``, forward and backward.
``implementation="reference"`` is the dense ``O(seq^2)`` oracle, written from the definition.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsek_jax import validation
from sparsek_jax.softmax import masked_softmax
from sparsek_jax.thresholds import document_index
from sparsek_kernels import layout

__all__ = ["block_topk_attention"]

IMPLEMENTATIONS = ("xla", "reference")


def block_topk_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, topk: int, window: int, block_size: int,
                         segment_ids: jax.Array | None = None, scale: float | None = None,
                         implementation: str = "xla") -> jax.Array:
    """Causal query-dependent block top-k attention with a sliding window (the module docstring defines it).

    Args:
      q: ``[batch, seq, q_heads, head_dim]``.
      k: ``[batch, seq, kv_heads, head_dim]``; ``q_heads`` must be a multiple of ``kv_heads`` (query head ``h``
        reads KV head ``h // (q_heads // kv_heads)``).
      v: ``[batch, seq, kv_heads, head_dim]``.
      topk: ``>= 0`` key budget per query beyond the window; ``topk // block_size`` blocks are selected.
      window: ``>= 0`` sliding-window length (0: selected blocks only).
      block_size: ``>= 1`` positions per key block.
      segment_ids: optional int ``[batch, seq]``; no attention and no pooling across documents. Documents are
        contiguous runs (as packing produces): concrete ids that come back after another id are rejected;
        under a trace every change of id starts a new document.
      scale: logit scale, default ``1 / sqrt(head_dim)``. It does not change which blocks are selected.
      implementation: ``"xla"`` (the default; no ``seq x seq`` array, any backend) or ``"reference"`` (the
        dense ``O(seq^2)`` oracle of the tests).

    Returns:
      ``[batch, seq, q_heads, head_dim]`` in ``q``'s dtype (computed in float32).
    """
    batch, seq, _, _, head_dim = _check_inputs(q, k, v, segment_ids)
    topk = validation.check_nonnegative_int("topk", topk)
    window = validation.check_nonnegative_int("window", window)
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
        raise ValueError(f"block_size: expected a positive Python int, received {block_size!r}")
    validation.check_choice("implementation", implementation, IMPLEMENTATIONS)
    validation.check_segment_runs(segment_ids)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else validation.check_scale(scale)
    segments = (jnp.zeros((batch, seq), jnp.int32) if segment_ids is None
                else jnp.asarray(segment_ids, jnp.int32))
    attention = _reference_attention if implementation == "reference" else _xla_attention
    return attention(q, k, v, segments, topk=topk, window=window, block_size=block_size, scale=scale)


def _check_inputs(q, k, v, segment_ids) -> tuple[int, int, int, int, int]:
    """``validation.check_attention_inputs`` without the scores; returns (batch, seq, q_heads, kv_heads, head_dim)."""
    validation.check_rank("q", q, 4, "[batch, seq, q_heads, head_dim]")
    validation.check_rank("k", k, 4, "[batch, seq, kv_heads, head_dim]")
    validation.check_rank("v", v, 4, "[batch, seq, kv_heads, head_dim]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        validation.check_float(name, x)
    batch, seq, q_heads, head_dim = np.shape(q)
    if head_dim < 1:
        raise ValueError(f"q: expected head_dim >= 1, received shape {tuple(np.shape(q))}")
    kv_shape = np.shape(k)
    if kv_shape[0] != batch or kv_shape[1] != seq or kv_shape[3] != head_dim:
        raise ValueError(f"k: expected shape ({batch}, {seq}, kv_heads, {head_dim}) to match q's batch, seq and "
                         f"head_dim, received {tuple(kv_shape)}")
    kv_heads = kv_shape[2]
    validation.check_same_shape("v", v, kv_shape, "(the shape of k)")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q: expected q_heads to be a multiple of kv_heads={kv_heads} (grouped-query attention), "
                         f"received q_heads={q_heads}")
    validation.check_segment_ids(segment_ids, batch, seq)
    return batch, seq, q_heads, kv_heads, head_dim


def _document_starts(segments):
    """int32 ``[batch, seq]``: the first position of each position's document (every change of id starts one)."""
    seq = segments.shape[1]
    change = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    return lax.cummax(jnp.where(change, jnp.arange(seq, dtype=jnp.int32), 0), axis=1)


def _mean(total, count):
    """``total / count`` with ``count`` broadcastable to ``total``, rounded once.

    XLA rewrites a division by a broadcast into a multiplication by the reciprocal, which rounds twice: blocks
    whose means are equal (say 19.25 / 7 and 22 / 8) would then differ in the last bit, and the tie rule
    would follow rounding instead of block order. The barrier keeps a true division.
    """
    return total / lax.optimization_barrier(jnp.broadcast_to(count, total.shape).astype(total.dtype))


def _top_blocks(qg, k, doc_start, *, window, block_size, num_selected):
    """int32 ``[b, hkv, G, seq, num_selected]``: each query's best blocks, ineligible ones (if chosen) last.

    ``qg [b, hkv, G, seq, d]`` and ``k [b, seq, hkv, d]`` float32. The candidates of query ``i`` in block ``c``
    are ``[max(c B, start_i), min(c B + B - 1, i - window)]``, so their key sum is a block total, a prefix of
    the block up to ``i - window`` or that minus the part of the block before ``start_i``. Prefix sums restart
    at every block, which keeps them as small as a block sum (global prefix sums would grow with ``seq`` and
    lose float32 precision to cancellation); only two blocks per query need the query's own boundaries, so
    ``q_i`` meets ``num_blocks`` block totals and two gathered partial sums.
    """
    batch, seq, kv_heads, head_dim = k.shape
    num_blocks = -(-seq // block_size)
    inclusive = jnp.cumsum(layout.blocks(k, num_blocks, block_size), axis=2)  # [b, nb, B, hkv, d]
    totals = inclusive[:, :, -1]
    exclusive = jnp.concatenate([jnp.zeros_like(inclusive[:, :, :1]), inclusive[:, :, :-1]], axis=2)

    def at(prefix, positions):  # [b, nb, B, hkv, d] at positions [b, seq] -> [b, seq, hkv, d]
        flat = prefix.reshape(batch, num_blocks * block_size, kv_heads, head_dim)
        return jnp.take_along_axis(flat, positions[:, :, None, None], axis=1)

    i = jnp.arange(seq, dtype=jnp.int32)
    newest = i - window  # newest candidate; < start_i when there is none
    dot = lambda x: jnp.einsum("zhgid,zihd->zhgi", qg, x)[..., None]
    q_upto_newest = dot(at(inclusive, jnp.broadcast_to(jnp.maximum(newest, 0), (batch, seq))))
    q_before_start = dot(at(exclusive, doc_start))
    q_totals = jnp.einsum("zhgid,zchd->zhgic", qg, totals)

    first = jnp.arange(num_blocks, dtype=jnp.int32) * block_size  # each block's first position
    lo = jnp.maximum(first, doc_start[:, :, None])  # [b, seq, nb]: the block's oldest and newest candidates
    hi = jnp.minimum(first + block_size - 1, newest[:, None])  # [seq, nb]
    per_block = lambda x: x[:, None, None]  # [b, seq, nb] -> [b, 1, 1, seq, nb]
    sums = (jnp.where(per_block((hi == newest[:, None])[None]), q_upto_newest, q_totals)
            - jnp.where(per_block(lo == doc_start[:, :, None]), q_before_start, 0.0))
    counts = per_block(hi[None] - lo + 1)
    scores = jnp.where(counts > 0, _mean(sums, jnp.maximum(counts, 1)), -jnp.inf)
    return lax.top_k(scores, num_selected)[1]


@functools.partial(jax.jit, static_argnames=("topk", "window", "block_size", "scale"))
def _xla_attention(q, k, v, segments, *, topk, window, block_size, scale):
    """Arguments as in ``block_topk_attention`` (validated; ``segments`` int32). Plain autodiff."""
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    num_selected = min(topk // block_size, -(-seq // block_size))
    window_slots = min(window, seq)  # keys older than the sequence start never exist
    qg = q.astype(jnp.float32).reshape(batch, seq, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    doc_start = _document_starts(segments)
    i = jnp.arange(seq, dtype=jnp.int32)

    parts = []  # per kind of slot: logits [b, hkv, G, seq, slots], allowed (broadcastable), values, output einsum
    if window_slots:
        positions = i[:, None] - window_slots + 1 + jnp.arange(window_slots, dtype=jnp.int32)  # [seq, w]
        allowed = (positions[None] >= doc_start[:, :, None])[:, None, None]  # also rules out positions < 0
        kw, vw = (jnp.moveaxis(x, 2, 1)[:, :, jnp.maximum(positions, 0)] for x in (k, v))  # [b, hkv, seq, w, d]
        parts.append((jnp.einsum("zhgid,zhijd->zhgij", qg, kw), allowed, vw, "zhgij,zhijd->zhgid"))
    if num_selected:
        blocks = _top_blocks(lax.stop_gradient(qg), lax.stop_gradient(k), doc_start, window=window,
                             block_size=block_size, num_selected=num_selected)
        slots = num_selected * block_size
        positions = (blocks[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)).reshape(
            blocks.shape[:-1] + (slots,))
        # Only candidates count: this also drops the slots of blocks chosen while ineligible (no candidate).
        allowed = ((positions >= doc_start[:, None, None, :, None])
                   & (positions <= (i - window)[:, None]))
        flat = jnp.where(allowed, positions, 0).reshape(batch, kv_heads, group * seq, slots)
        ks, vs = (layout.gather_rows(x, flat).reshape(batch, kv_heads, group, seq, slots, head_dim)
                  for x in (k, v))
        parts.append((jnp.einsum("zhgid,zhgijd->zhgij", qg, ks), allowed, vs, "zhgij,zhgijd->zhgid"))
    if not parts:
        return jnp.zeros_like(q)

    logits = jnp.concatenate([p[0] for p in parts], axis=-1) * scale
    allowed = jnp.concatenate([jnp.broadcast_to(p[1], p[0].shape) for p in parts], axis=-1)
    probs, _ = masked_softmax(logits, allowed)
    out, offset = 0.0, 0
    for part_logits, _, values, spec in parts:
        width = part_logits.shape[-1]
        out = out + jnp.einsum(spec, probs[..., offset:offset + width], values)
        offset += width
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, q_heads, head_dim).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("topk", "window", "block_size", "scale"))
def _reference_attention(q, k, v, segments, *, topk, window, block_size, scale):
    """The dense oracle: the ``[batch, q_heads, seq, seq]`` pattern from the definition. Block scores are the
    means of the logits ``q_i . k_j`` over each block's candidates (equal to ``q_i . pooled_b`` by linearity) and
    a block is selected when fewer than ``topk // block_size`` eligible blocks beat it."""
    seq = q.shape[1]
    group = q.shape[2] // k.shape[2]
    dtype = q.dtype
    q = q.astype(jnp.float32)
    k, v = (jnp.repeat(x.astype(jnp.float32), group, axis=2) for x in (k, v))
    docs = document_index(segments)
    i = jnp.arange(seq)[:, None]
    j = jnp.arange(seq)[None, :]
    visible = (docs[:, :, None] == docs[:, None, :]) & (j <= i)  # [b, seq, seq]
    in_window = (visible & (j > i - window))[:, None]
    candidate = visible & (j <= i - window)

    num_blocks = -(-seq // block_size)
    member = (jnp.arange(seq)[:, None] // block_size == jnp.arange(num_blocks)[None, :]).astype(jnp.float32)
    qk = jnp.einsum("bihd,bjhd->bhij", q, k)  # [b, hq, seq, seq]
    counts = jnp.einsum("bij,jc->bic", candidate.astype(jnp.float32), member)[:, None]  # [b, 1, seq, nb]
    sums = jnp.einsum("bhij,jc->bhic", jnp.where(candidate[:, None], lax.stop_gradient(qk), 0.0), member)
    eligible = counts > 0
    score = jnp.where(eligible, _mean(sums, jnp.maximum(counts, 1.0)), -jnp.inf)
    c = jnp.arange(num_blocks)
    beats = ((score[..., :, None] > score[..., None, :])
             | ((score[..., :, None] == score[..., None, :]) & (c[:, None] < c[None, :])))  # [.., rival, block]
    rank = jnp.sum(beats & eligible[..., :, None], axis=-2)
    chosen = eligible & (rank < topk // block_size)  # [b, hq, seq, nb]
    selected = candidate[:, None] & jnp.take(chosen, jnp.arange(seq) // block_size, axis=-1)

    probs, _ = masked_softmax(qk * scale, in_window | selected)
    return jnp.einsum("bhij,bjhd->bihd", probs, v).astype(dtype)
