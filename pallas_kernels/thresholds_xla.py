"""The threshold steps in plain XLA: the path on CPU and TPU, and the twin every Pallas kernel of
``thresholds_pallas`` is tested against. Each function here has a twin there with the same signature:

- ``xla_exclusive_scan`` / ``pallas_exclusive_scan``: the exclusive prefix of per-chunk summaries (the top
  ``R`` keys before each chunk), here a rolled doubling scan whose combine merges two sorted lists by
  counting ranks and a scatter; both merges are exact, so the twins agree bit for bit on what a prefix
  means (its keys, the largest score cut, the document of its last key);
- ``xla_cut_states`` / ``pallas_cut_states``: the state each lane starts from;
- ``xla_lanes`` / ``pallas_lanes``: the event simulation (``simulation.run_lanes``), all lanes at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sparsek_kernels.common import count_leading
from sparsek_kernels.simulation import (LIST_FIELDS, NEG_INF, Cut, LaneInfo, Lists, Outputs, Summaries,
                                        chunk_cut_state, list_widths, run_lanes, unflatten_outputs)


def _bits(x):
    """int32 ``x``, the bits of float32 ``x``, or bool ``x`` as 0/1: fields of different types side by side."""
    return lax.bitcast_convert_type(x, jnp.int32) if x.dtype == jnp.float32 else x.astype(jnp.int32)


def _from_bits(x, dtype):
    """The inverse of ``_bits`` for a field of ``dtype``."""
    return lax.bitcast_convert_type(x, jnp.float32) if dtype == jnp.float32 else x.astype(dtype)


def doubling_scan(combine, elems, axis: int = 0):
    """Inclusive scan of a pytree along ``axis`` by recursive doubling in a rolled loop: step ``s`` combines
    every element with the one ``2**s`` before it. ``O(n log n)`` combines where ``lax.associative_scan``
    does ``O(n)``, but the program does not depend on the length (``associative_scan`` unrolls its levels,
    so every new length compiles a larger program)."""
    leaves = jax.tree.leaves(elems)
    length = leaves[0].shape[axis]

    def step(s, xs):
        shift = jnp.left_shift(1, s)
        combined = combine(jax.tree.map(lambda x: jnp.roll(x, shift, axis), xs), xs)

        def keep_first(c, x):  # the first 2**s elements have nothing that far before them
            index = jnp.arange(length).reshape([length if d == axis else 1 for d in range(x.ndim)])
            return jnp.where(index >= shift, c, x)

        return jax.tree.map(keep_first, combined, xs)

    return lax.fori_loop(0, max(length - 1, 0).bit_length(), step, elems)


def _merge_lists(a_scores, a_pos, b_scores, b_pos, keep_b):
    """Top R of two sorted lists by (score, position) descending, where every key of b is newer (it wins
    ties), batched over the first axis: each key's place in the merged list is its index plus its rank in the
    other list, then a scatter. ``keep_b`` [pairs] bool: return ``b`` unchanged. Returns (scores, positions)
    and the largest score that did not fit (``-inf`` where ``keep_b``)."""
    buffer_size = a_scores.shape[-1]

    def merge(a_scores, a_pos, b_scores, b_pos):
        index = jnp.arange(buffer_size, dtype=jnp.int32)
        # Both lists' ranks in the other by one binary search (a rolled loop: small programs): for a key of a,
        # the b keys with a score >= its own; for a key of b, the a keys with a score > its own.
        of_a = jnp.arange(2 * buffer_size) < buffer_size
        scores = jnp.concatenate([a_scores, b_scores])
        ahead = lambda i: jnp.where(of_a, b_scores[i] >= scores, a_scores[i] > scores)
        ranks = count_leading(ahead, jnp.zeros(2 * buffer_size, jnp.int32),
                              jnp.full(2 * buffer_size, buffer_size, jnp.int32), buffer_size.bit_length())
        dest = jnp.concatenate([index, index]) + ranks
        keys = jnp.stack([_bits(scores), jnp.concatenate([a_pos, b_pos])], axis=-1)  # one scatter for both
        empty = jnp.asarray([_bits(jnp.float32(NEG_INF)), -1], jnp.int32)
        merged = jnp.broadcast_to(empty, keys.shape).at[dest].set(keys, mode="drop")
        return _from_bits(merged[:, 0], jnp.float32), merged[:, 1]

    scores, pos = jax.vmap(merge)(a_scores, a_pos, b_scores, b_pos)
    keep = keep_b[:, None]
    return (jnp.where(keep, b_scores, scores[:, :buffer_size]), jnp.where(keep, b_pos, pos[:, :buffer_size]),
            jnp.where(keep_b, -jnp.inf, scores[:, buffer_size]))


def _combine(a: Summaries, b: Summaries) -> Summaries:
    """The summary of range ``a`` followed by range ``b``, batched over leading axes (``[..., R]`` lists):
    the merge of the two lists (every key of b is newer, so it wins ties; ``O(R log R)``, no sort), or b's
    alone when b starts a new document."""
    buffer_size = a.z.shape[-1]
    lead = a.z.shape[:-1]
    flat = lambda x: x.reshape((-1, buffer_size))
    boundary = (b.docs[..., 2] > 0) | (a.docs[..., 1] != b.docs[..., 0])  # b is not a's continuation
    z, pos, lost = _merge_lists(flat(a.z), flat(a.pos), flat(b.z), flat(b.pos), boundary.reshape(-1))
    dropped = jnp.maximum(jnp.maximum(a.dropped, b.dropped), lost.reshape(lead + (1,)))
    docs = jnp.stack([a.docs[..., 0], b.docs[..., 1], ((a.docs[..., 2] > 0) | boundary).astype(jnp.int32),
                      jnp.zeros_like(boundary, jnp.int32)], axis=-1)
    return Summaries(z.reshape(lead + (buffer_size,)), pos.reshape(lead + (buffer_size,)),
                     jnp.where(boundary[..., None], b.dropped, dropped), docs)


def xla_exclusive_scan(leaves: Summaries) -> Summaries:
    """Exclusive prefix summaries along axis 1 (element ``c``: the chunks before ``c``; element 0: empty):
    a rolled doubling scan, then a shift by one. Of ``docs`` only the last key's document (``docs[..., 1]``)
    is a prefix's: the first document and the reset flag are the scan's own bookkeeping."""
    inclusive = doubling_scan(_combine, leaves, axis=1)
    rows, _, R = leaves.z.shape
    empty = Summaries(jnp.full((rows, 1, R), NEG_INF, jnp.float32), jnp.full((rows, 1, R), -1, jnp.int32),
                      jnp.full((rows, 1, 1), NEG_INF, jnp.float32),
                      jnp.broadcast_to(jnp.asarray([-2, -2, 0, 0], jnp.int32), (rows, 1, 4)))
    return Summaries(*(jnp.concatenate([e, x[:, :-1]], axis=1) for e, x in zip(empty, inclusive)))


def sum_stacked(terms: tuple) -> tuple:
    """``simulation.ExactSums`` as one reduction per dtype: the int32 terms stacked and summed in int32 (they
    include positions, beyond float32's 2**24), the float32 terms likewise (their sums are exact in any
    grouping)."""
    sums = {}
    for dtype in dict.fromkeys(t.dtype for t in terms):  # in order of appearance: the same program every run
        group = [n for n, t in enumerate(terms) if t.dtype == dtype]
        sums.update(zip(group, jnp.sum(jnp.stack([terms[n] for n in group]), axis=-1)))
    return tuple(sums[n] for n in range(len(terms)))


def xla_cut_states(a_z, a_pos, q_z, q_pos, q_seg, scalars, *, k: int) -> tuple[Cut, Cut]:
    """(state at each chunk's start, state at its first cut) for ``[chunks, ...]`` inputs, in plain XLA.

    Both come from one vmapped ``cut_state`` over twice the chunks (XLA compiles a kernel per reduction, and
    the function has dozens): a chunk's start is its state at a cut with no key of the chunk visible, which is
    ``chunk_cut_state(at_cut=False)`` wherever the lanes read it (more than ``k`` keys before the chunk)."""
    a_count, a_doc = scalars[:, 0], scalars[:, 1]
    at_start = jnp.stack([a_count, a_doc, jnp.full_like(a_count, -1), a_doc], axis=-1)  # no cut: Q invisible
    per_chunk = jax.vmap(functools.partial(chunk_cut_state, at_cut=True, k=k, exact_sums=sum_stacked))
    states = jax.vmap(per_chunk, in_axes=(None,) * 5 + (0,))(a_z, a_pos, q_z, q_pos, q_seg,
                                                             jnp.stack([at_start, scalars]))
    return jax.tree.map(lambda x: x[0], states), jax.tree.map(lambda x: x[1], states)


# What a lane emits per position (``Outputs`` before ``anchor_top``): its dtype and its value where nothing is.
_PER_POSITION = ((jnp.float32, NEG_INF), (jnp.float32, NEG_INF), (jnp.int32, -1), (jnp.int32, 0), (bool, True))


def _packed_reads(lists: Lists, lane, buffer_size: int, chunk: int):
    """``simulation.lane_reads`` with one gather per list and step: the list's fields side by side (scores as
    their int32 bits), the rows of all its requests in one index array. The same values in fewer kernels (XLA
    compiles one per gather, and a step reads thirteen entries)."""
    width = list_widths(buffer_size, chunk)
    packed = {name: jnp.stack([_bits(getattr(lists, f"{name}_{field}")) for field in fields], axis=-1)
              for name, fields in LIST_FIELDS.items()}

    def load(requests):
        rows = {}  # per list, its requests' rows in order: [lanes, fields] each
        for name in LIST_FIELDS:
            indices = [index for n, _, index in requests if n == name]
            if indices:
                flat = lane * width[name] + jnp.clip(jnp.stack(indices), 0, width[name] - 1)  # [reads, lanes]
                rows[name] = iter(packed[name][flat])
        values = []
        for name, fields, _ in requests:
            row = next(rows[name])
            columns = (row[:, LIST_FIELDS[name].index(field)] for field in fields)
            values.append(tuple(_from_bits(x, getattr(lists, f"{name}_{field}").dtype)
                                for field, x in zip(fields, columns)))
        return tuple(values)

    return load


def xla_lanes(lists: Lists, info: LaneInfo, chunk_cut: Cut, start_cut: Cut, *, k: int, buffer_size: int,
              chunk: int, block: int, anchor_offset: int) -> Outputs:
    """All lanes at once in plain XLA (the CPU/TPU path and the kernels' twin); see ``run_lanes``. The values
    emitted per position are stored side by side as int32 bits, one scatter per step (XLA compiles a kernel for
    every scatter), and the anchor rows' in a second."""
    lanes, rows = info.start.shape[0], chunk // block

    def store(outputs, slot, anchor_slot, values):
        per_position, anchor_top = outputs
        return (per_position.at[slot].set(jnp.stack([_bits(v) for v in values[:5]], axis=-1)),
                anchor_top.at[anchor_slot].set(values[5]))

    empty = jnp.asarray([_bits(jnp.asarray(v, dtype)) for dtype, v in _PER_POSITION], jnp.int32)
    buffers = (jnp.broadcast_to(empty, (lanes * (chunk + 1), len(_PER_POSITION))),
               jnp.zeros((lanes * (rows + 1),), jnp.int32))
    per_position, anchor_top = run_lanes(lists, info, chunk_cut, start_cut, store, buffers, k=k,
                                         buffer_size=buffer_size, chunk=chunk, block=block,
                                         anchor_offset=anchor_offset, load=_packed_reads)
    columns = (_from_bits(per_position[:, n], dtype) for n, (dtype, _) in enumerate(_PER_POSITION))
    return unflatten_outputs(Outputs(*columns, anchor_top), lanes, chunk, rows)
