"""The threshold steps as Pallas GPU (Triton-lowered) kernels, each the twin of a function in
``thresholds_xla`` with the same signature and results (tested bit for bit or to float rounding):

- ``pallas_exclusive_scan``: the exclusive prefix of per-chunk summaries by a work-efficient tree scan, one
  ``pallas_call`` per level, pairs picked by block index maps, lists merged by merge path (co-ranking);
- ``pallas_cut_states``: the chunks' start states and first cuts, one program per chunk;
- ``pallas_lanes``: the event simulation (``simulation.run_lanes``), a block of lanes per program.

Launch parameters: ``Launch`` (measured on the H200: ``benchmarks.gpu_threshold_tuning``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sparsek_kernels.common import count_leading
from sparsek_kernels.simulation import (CUT_FLOATS, CUT_INTS, NEG_INF, Cut, LaneInfo, Lists, Outputs, Summaries,
                                        chunk_cut_state, run_lanes, unflatten_outputs,
                                        unpack_scalars)


class Launch(NamedTuple):
    """Launch parameters of the threshold kernels (measured on the H200: ``benchmarks.gpu_threshold_tuning``).

    lanes_per_program, lane_warps: lanes (one per vector element) and warps of each event-simulation program.
    cut_state_warps, scan_warps: warps of each cut-state program and of each program of the summaries' tree
      scan.
    """

    lanes_per_program: int = 8
    lane_warps: int = 1
    cut_state_warps: int = 4
    scan_warps: int = 4


DEFAULT_LAUNCH = Launch()


def _compiler_params(interpret: bool, num_warps: int):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


@functools.partial(jax.jit, static_argnames=("k", "buffer_size", "chunk", "block", "anchor_offset", "interpret",
                                             "lanes_per_program", "num_warps"))
def pallas_lanes(lists: Lists, info: LaneInfo, chunk_cut: Cut, start_cut: Cut, *, k: int, buffer_size: int,
                 chunk: int, block: int, anchor_offset: int, interpret: bool = False,
                 lanes_per_program: int = DEFAULT_LAUNCH.lanes_per_program,
                 num_warps: int = DEFAULT_LAUNCH.lane_warps) -> Outputs:
    """``xla_lanes`` as a Pallas GPU (Triton) kernel: ``lanes_per_program`` lanes per program, one per vector
    element, each gathering from its own lists; the same ``run_lanes`` code, with stores to the output refs."""
    lanes = info.start.shape[0]
    P = lanes_per_program
    programs = -(-lanes // P)
    pad = programs * P - lanes
    R, C = buffer_size, chunk
    rows_per_lane = C // block

    def blocked(x, width, fill):  # [lanes * width] -> [programs, P * width]
        return jnp.pad(x, (0, pad * width), constant_values=fill).reshape(programs, P * width)

    list_widths = (R, R, C, C, C, C, C)
    list_fills = (NEG_INF, -1, NEG_INF, -1, -1, NEG_INF, -1)
    list_args = [blocked(x, w, f) for x, w, f in zip(lists, list_widths, list_fills)]
    scalar_args = [blocked(x, 1, 0) for x in (*info, *chunk_cut, *start_cut)]  # padding lanes: length 0
    n_info, n_cut = len(info), len(chunk_cut)

    def kernel(*refs):
        list_refs = Lists(*refs[:7])
        values = [r[...] for r in refs[7:7 + n_info + 2 * n_cut]]
        out_refs = refs[7 + n_info + 2 * n_cut:]

        def store(outputs, slot, anchor_slot, emitted):
            for ref, v in zip(out_refs[:5], emitted[:5]):
                ref[slot] = v.astype(ref.dtype)
            out_refs[5][anchor_slot] = emitted[5]
            return outputs

        run_lanes(list_refs, LaneInfo(*values[:n_info]), Cut(*values[n_info:n_info + n_cut]),
                  Cut(*values[n_info + n_cut:]), store, jnp.int32(0), k=k, buffer_size=R, chunk=C, block=block,
                  anchor_offset=anchor_offset)

    list_specs = [pl.BlockSpec((None, P * w), lambda i: (i, 0)) for w in list_widths]
    scalar_specs = [pl.BlockSpec((None, P), lambda i: (i, 0)) for _ in scalar_args]
    widths = [C + 1] * 5 + [rows_per_lane + 1]
    dtypes = [jnp.float32, jnp.float32, jnp.int32, jnp.int32, jnp.int32, jnp.int32]
    out_specs = [pl.BlockSpec((None, P * w), lambda i: (i, 0)) for w in widths]
    out_shape = [jax.ShapeDtypeStruct((programs, P * w), d) for w, d in zip(widths, dtypes)]
    outs = pl.pallas_call(kernel, grid=(programs,), in_specs=list_specs + scalar_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret, name="sparsek_threshold_lanes",
                          compiler_params=_compiler_params(interpret, num_warps))(*list_args, *scalar_args)
    # Slots that are never emitted (positions past a chunk's length, padding lanes) are garbage; the caller
    # reads only real positions and masks anchor rows past the sequence.
    return unflatten_outputs(Outputs(*(x.reshape(-1) for x in outs)), lanes, C, rows_per_lane)


def _pow2_columns(x, fill):
    """Pads the last axis to a power of two (Triton blocks are powers of two)."""
    width = 1 << max(x.shape[-1] - 1, 0).bit_length()
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])], constant_values=fill)


@functools.partial(jax.jit, static_argnames=("k", "interpret", "num_warps"))
def pallas_cut_states(a_z, a_pos, q_z, q_pos, q_seg, scalars, *, k: int, interpret: bool = False,
                      num_warps: int = DEFAULT_LAUNCH.cut_state_warps) -> tuple[Cut, Cut]:
    """``xla_cut_states`` as two Pallas GPU kernels (the chunks' start states, the first cuts), one program
    per chunk each. A state whose visible set has at most ``k`` keys is skipped (zeros; the lanes do not
    read it): most chunks have no first cut."""
    a_z, a_pos = _pow2_columns(a_z, NEG_INF), _pow2_columns(a_pos, -1)
    q_z, q_pos, q_seg = _pow2_columns(q_z, NEG_INF), _pow2_columns(q_pos, -1), _pow2_columns(q_seg, -1)
    chunks, R = a_z.shape
    C = q_z.shape[1]

    def states(at_cut: bool) -> Cut:
        def kernel(a_z_ref, a_pos_ref, q_z_ref, q_pos_ref, q_seg_ref, scalars_ref, f_ref, i_ref):
            scalars = scalars_ref[...]
            a_count, _, cut_pos, _ = unpack_scalars(scalars)
            needed = cut_pos >= 0 if at_cut else a_count > k

            def compute(_):
                st = chunk_cut_state(a_z_ref[...], a_pos_ref[...], q_z_ref[...], q_pos_ref[...], q_seg_ref[...],
                                     scalars, at_cut=at_cut, k=k)
                lane8, lane16 = lax.iota(jnp.int32, 8), lax.iota(jnp.int32, 16)
                f = jnp.zeros((8,), jnp.float32)
                for n, name in enumerate(CUT_FLOATS):
                    f = jnp.where(lane8 == n, getattr(st, name), f)
                i = jnp.zeros((16,), jnp.int32)
                for n, name in enumerate(CUT_INTS):
                    i = jnp.where(lane16 == n, getattr(st, name), i)
                return f, i

            empty = lambda _: (jnp.zeros((8,), jnp.float32), jnp.zeros((16,), jnp.int32))
            f, i = lax.cond(needed, compute, empty, 0)
            f_ref[...] = f
            i_ref[...] = i

        row = lambda w: pl.BlockSpec((None, w), lambda c: (c, 0))
        f, i = pl.pallas_call(kernel, grid=(chunks,), in_specs=[row(R)] * 2 + [row(C)] * 3 + [row(4)],
                              out_specs=[row(8), row(16)],
                              out_shape=[jax.ShapeDtypeStruct((chunks, 8), jnp.float32),
                                         jax.ShapeDtypeStruct((chunks, 16), jnp.int32)],
                              interpret=interpret,
                              name="sparsek_threshold_first_cuts" if at_cut else "sparsek_threshold_start_states",
                              compiler_params=_compiler_params(interpret, num_warps))(a_z, a_pos, q_z, q_pos,
                                                                                      q_seg, scalars)
        fields = {name: f[:, n] for n, name in enumerate(CUT_FLOATS)}
        fields.update({name: i[:, n] for n, name in enumerate(CUT_INTS)})
        return Cut(**fields)

    return states(False), states(True)


def _merged_top(read_a, read_b, slots, width: int):
    """Keys ``slots`` (an int vector) of the merge of two lists of ``width`` keys sorted by (score, position)
    descending, where every key of b is newer (it wins ties), by merge path: slot ``p`` holds ``a[i]`` or
    ``b[p - i]``, with ``i`` the number of a's keys among the first ``p`` (one binary search of gathers per
    slot, no scatter). ``read_a(field, idx)`` / ``read_b`` gather ``z`` or ``pos``."""
    top = width - 1
    i = count_leading(lambda j: (j < slots) & (read_a("z", j) > read_b("z", jnp.clip(slots - j - 1, 0, top))),
                      jnp.zeros_like(slots), jnp.minimum(slots, width), int(width).bit_length())
    j = slots - i
    az, apos = read_a("z", jnp.minimum(i, top)), read_a("pos", jnp.minimum(i, top))
    bz, bpos = read_b("z", jnp.clip(j, 0, top)), read_b("pos", jnp.clip(j, 0, top))
    from_a = (i < width) & ((j >= width) | (az > bz))
    return jnp.where(from_a, az, bz), jnp.where(from_a, apos, bpos)


def _combine_in_kernel(a, b, read_a, read_b, buffer_size: int):
    """``a`` then ``b`` (each (z [W], pos [W], dropped [1], docs [4]) loaded from refs): the summary of the two
    ranges, as ``thresholds_xla`` combines them."""
    (a_z, _, a_dropped, a_docs), (b_z, b_pos, b_dropped, b_docs) = a, b
    width = a_z.shape[0]
    field = lambda docs, n: jnp.sum(jnp.where(lax.iota(jnp.int32, 4) == n, docs, 0))
    boundary = (field(b_docs, 2) > 0) | (field(a_docs, 1) != field(b_docs, 0))  # b is not a's continuation
    slots = lax.iota(jnp.int32, width)
    z, pos = _merged_top(read_a, read_b, slots, width)
    kept = slots < buffer_size
    z = jnp.where(boundary, b_z, jnp.where(kept, z, NEG_INF))
    pos = jnp.where(boundary, b_pos, jnp.where(kept, pos, -1))
    lost, _ = _merged_top(read_a, read_b, jnp.full((1,), buffer_size, jnp.int32), width)
    dropped = jnp.where(boundary, b_dropped, jnp.maximum(jnp.maximum(a_dropped, b_dropped), lost))
    index = lax.iota(jnp.int32, 4)
    docs = jnp.where(index == 0, field(a_docs, 0), jnp.where(index == 1, field(b_docs, 1), jnp.where(
        index == 2, ((field(a_docs, 2) > 0) | boundary).astype(jnp.int32), 0)))
    return z, pos, dropped, docs


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps"))
def pallas_exclusive_scan(leaves: Summaries, *, interpret: bool = False,
                          num_warps: int = DEFAULT_LAUNCH.scan_warps) -> Summaries:
    """Exclusive prefix summaries along axis 1 (element ``c``: the chunks before ``c``; element 0: empty) by
    a work-efficient tree scan, one ``pallas_call`` per level: an up-sweep of pairwise combines (``n - 1`` in
    all), then a down-sweep that hands every node's prefix to its left child and combines it with the left
    child's sum for its right child. Each level reads its pairs and writes its outputs through block index
    maps, so no level copies or interleaves arrays outside the kernels. ``n`` and the lists' width ``R`` are
    padded to powers of two inside."""
    rows, n, buffer_size = leaves.z.shape
    leaves = leaves._replace(z=_pow2_columns(leaves.z, NEG_INF), pos=_pow2_columns(leaves.pos, -1))
    width = leaves.z.shape[-1]
    levels = max(n - 1, 0).bit_length()
    pad = (1 << levels) - n
    empty = Summaries(jnp.full((rows, 1, width), NEG_INF, jnp.float32), jnp.full((rows, 1, width), -1, jnp.int32),
                      jnp.full((rows, 1, 1), NEG_INF, jnp.float32),
                      jnp.broadcast_to(jnp.asarray([-2, -2, 0, 0], jnp.int32), (rows, 1, 4)))
    # Padding after the last chunk never reaches an earlier chunk's exclusive prefix.
    leaves = Summaries(*(jnp.concatenate([x, jnp.broadcast_to(e, (rows, pad) + x.shape[2:])], axis=1)
                         for x, e in zip(leaves, empty)))
    shapes = lambda m, d: [jax.ShapeDtypeStruct((rows, m) + d + (w,), t) for w, t in
                           ((width, jnp.float32), (width, jnp.int32), (1, jnp.float32), (4, jnp.int32))]
    block = lambda w, pick: pl.BlockSpec((None, None, w), lambda r, i: (r, pick(i), 0))
    params = _compiler_params(interpret, num_warps)

    def loaded(refs):
        z_ref, pos_ref, dropped_ref, docs_ref = refs
        reader = lambda f, idx: (z_ref if f == "z" else pos_ref)[idx]
        return (z_ref[...], pos_ref[...], dropped_ref[...], docs_ref[...]), reader

    def specs(pick):
        return [block(w, pick) for w in (width, width, 1, 4)]

    # Up-sweep: sums[l] has n / 2**l nodes; node i of level l + 1 combines nodes 2i and 2i + 1 of level l.
    sums = [leaves]
    for level in range(levels):
        m = sums[-1].z.shape[1] // 2

        def up(*refs):
            (a, read_a), (b, read_b) = loaded(refs[0:4]), loaded(refs[4:8])
            for ref, value in zip(refs[8:], _combine_in_kernel(a, b, read_a, read_b, buffer_size)):
                ref[...] = value

        src = sums[-1]
        out = pl.pallas_call(up, grid=(rows, m), in_specs=specs(lambda i: 2 * i) + specs(lambda i: 2 * i + 1),
                             out_specs=specs(lambda i: i), out_shape=shapes(m, ()), interpret=interpret,
                             name="sparsek_threshold_scan_up", compiler_params=params)(*src, *src)
        sums.append(Summaries(*out))

    # Down-sweep: prefix of the root is empty; a node's left child gets its prefix, the right child the
    # prefix combined with the left child's sum. Children are written as one [2, ...] block per node.
    prefix = empty
    for level in reversed(range(levels)):
        m = sums[level].z.shape[1] // 2

        def down(*refs):
            (p, read_p), (left, read_left) = loaded(refs[0:4]), loaded(refs[4:8])
            right = _combine_in_kernel(p, left, read_p, read_left, buffer_size)
            for ref, first, second in zip(refs[8:], p, right):
                row = lax.broadcasted_iota(jnp.int32, (2,) + first.shape, 0)
                ref[...] = jnp.where(row == 0, first[None], second[None])

        pair = lambda w: pl.BlockSpec((None, None, 2, w), lambda r, i: (r, i, 0, 0))
        out = pl.pallas_call(down, grid=(rows, m), in_specs=specs(lambda i: i) + specs(lambda i: 2 * i),
                             out_specs=[pair(w) for w in (width, width, 1, 4)], out_shape=shapes(m, (2,)),
                             interpret=interpret, name="sparsek_threshold_scan_down",
                             compiler_params=params)(*prefix, *sums[level])
        prefix = Summaries(*(x.reshape((rows, 2 * m) + x.shape[3:]) for x in out))
    return Summaries(prefix.z[:, :n, :buffer_size], prefix.pos[:, :n, :buffer_size], prefix.dropped[:, :n],
                     prefix.docs[:, :n])
