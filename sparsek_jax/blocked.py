"""The blocked implementations behind one custom VJP: thresholds once, then the chosen backend's forward and
backward (``"xla"``: ``sparsek_jax.xla_attention``; ``"pallas_gpu"`` / ``"pallas_tpu"`` / ``"triton"``: the
adapters in ``sparsek_kernels.gpu`` / ``.tpu`` / ``.triton_adapter``), and the scores' gradient, which is the
same for all.

Backward, with ``P`` the softmax and ``g`` the gates (docs/xla_attention.md derives it): the backends return
``dq``, ``dk``, ``dv``, the direct term ``sum_i [l in M_i] G_il`` per key and, per query, ``sum_j G_ij`` over
its fractional keys. Through ``g_ij = clip(u_j - tau_i, 0, 1)`` and the SPARSEK VJP,
``du_l = sum_i [l in M_i] G_il - sum_i [l in M_i] Gbar_i`` with ``Gbar_i = sum_j G_ij / |M_i|``; the second sum
is a range sum over queries (``fractional_range_sums``).

Under a device mesh the whole computation runs per shard (``shard_map``) over the batch and KV-head axes
named by ``MeshAxes``: every row of scores is independent, so no device needs another's keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from sparsek_jax import xla_attention
from sparsek_jax.block_sizes import BlockSizes
from sparsek_jax.thresholds import BlockedThresholds, blocked_thresholds, fractional_range_sums
from sparsek_kernels.layout import Selection, no_selection

__all__ = ["MeshAxes", "blocked_attention"]


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """Mesh axes the attention's inputs are split over: ``batch`` (a name, a tuple of names or None) and
    ``heads`` (the KV heads and their query heads; a name or None). Inside ``jax.set_mesh(mesh)`` the blocked
    paths then run per shard under ``shard_map``; without a mesh the axes are ignored."""

    batch: str | tuple[str, ...] | None = None
    heads: str | None = None


class _Config(NamedTuple):
    topk: int
    window: int
    gate: str
    scale: float
    implementation: str
    blocks: BlockSizes      # resolved for the implementation
    buffer_size: int
    interpret: bool


class _Backend(NamedTuple):
    forward: Callable
    backward: Callable
    options: object


def _backend(cfg: _Config) -> _Backend:
    b = cfg.blocks
    if cfg.implementation == "pallas_gpu":
        from sparsek_kernels import gpu

        return _Backend(gpu.attention_forward, gpu.attention_backward, gpu.Options(
            cfg.window, cfg.gate, cfg.scale, b.block_q, b.block_k, b.blocks_per_group, b.num_warps, b.num_stages,
            cfg.interpret))
    if cfg.implementation == "triton":
        from sparsek_kernels import triton_adapter

        return _Backend(triton_adapter.attention_forward, triton_adapter.attention_backward, triton_adapter.Options(
            cfg.window, cfg.gate, cfg.scale, b.block_q, b.tile_rows, b.block_k, b.backward_block_k, b.num_warps,
            b.num_stages, cfg.interpret))
    if cfg.implementation == "pallas_tpu":
        from sparsek_kernels import tpu

        return _Backend(tpu.attention_forward, tpu.attention_backward, tpu.Options(
            cfg.window, cfg.gate, cfg.scale, b.block_q, b.block_k, b.blocks_per_group, cfg.interpret))
    return _Backend(xla_attention.forward, xla_attention.backward,
                    xla_attention.Options(cfg.window, cfg.gate, cfg.scale, b.block_q))


def _materialized_scores(scores):
    """float32 scores computed once. The selection compares scores for equality (``u_j == theta_i`` picks
    the k-th key itself); if XLA fused the scores' producer into several consumers (thresholds, tiles,
    kernel inputs), each copy could round differently (e.g. an FMA in one fusion only) and a key would miss
    its own threshold. The barrier makes every consumer read the same buffer."""
    return lax.optimization_barrier(lax.stop_gradient(scores.astype(jnp.float32)))


def _threshold_implementation(cfg: _Config) -> str:
    """The GPU paths compute thresholds with the Pallas kernels. Interpreting the Triton attention kernels, the
    XLA twin (bit for bit the same thresholds) keeps the interpreter to the attention."""
    if cfg.implementation == "pallas_gpu" or (cfg.implementation == "triton" and not cfg.interpret):
        return "pallas_gpu"
    return "xla"


def _thresholds(scores, segments, cfg: _Config) -> BlockedThresholds | None:
    if cfg.topk == 0:  # plain sliding window: nothing to select
        return None
    with jax.named_scope("thresholds"):
        return blocked_thresholds(scores, segments, topk=cfg.topk, window=cfg.window, buffer_size=cfg.buffer_size,
                                  block_size=cfg.blocks.block_q, scan_block=cfg.blocks.threshold_chunk,
                                  implementation=_threshold_implementation(cfg),
                                  interpret=cfg.interpret)


def _selection(th: BlockedThresholds | None, scores, cfg: _Config) -> Selection:
    batch, seq, kv_heads = scores.shape
    if th is None:
        return no_selection(batch, seq, kv_heads, -(-seq // cfg.blocks.block_q))
    return Selection(th.tau, th.theta, th.theta_pos, th.anchors)


def _forward(q, k, v, scores, segments, cfg: _Config):
    th = _thresholds(scores, segments, cfg)
    backend = _backend(cfg)
    out, lse = backend.forward(q, k, v, scores, segments, _selection(th, scores, cfg), backend.options)
    return out, lse, th


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, scores, segments, cfg: _Config):
    out, _, _ = _forward(q, k, v, _materialized_scores(scores), segments, cfg)
    return out.astype(q.dtype)


def _attention_fwd(q, k, v, scores, segments, cfg: _Config):
    scores32 = _materialized_scores(scores)
    out, lse, th = _forward(q, k, v, scores32, segments, cfg)
    # The residual is the materialised copy, so that the backward compares the very floats `th` came from.
    # A zero of the scores' dtype carries that dtype to the backward (residuals must be arrays).
    return out.astype(q.dtype), (q, k, v, scores32, segments, out, lse, th, jnp.zeros((), scores.dtype))


def _scores_gradient(direct, gsum, th: BlockedThresholds | None, scores, segments, cfg: _Config):
    """``du_l = sum_i [l in M_i] G_il - sum_i [l in M_i] Gbar_i``; every argument ``[b, seq, hkv]``."""
    if cfg.gate == "none" or th is None:
        return jnp.zeros(scores.shape, jnp.float32)
    with jax.named_scope("scores_gradient"):
        gbar = gsum / jnp.maximum(th.num_fractional, 1)
        heads_first = lambda x: jnp.moveaxis(x, 2, 1)
        through_tau = fractional_range_sums(heads_first(gbar), heads_first(scores), heads_first(th.tau), segments,
                                            cfg.window)
        return direct - jnp.moveaxis(through_tau, 1, 2)


def _attention_bwd(cfg: _Config, residuals, d_out):
    q, k, v, scores, segments, out, lse, th, scores_dtype = residuals
    backend = _backend(cfg)
    dq, dk, dv, direct, gsum = backend.backward(q, k, v, scores, segments, _selection(th, scores, cfg), out, lse,
                                                d_out, backend.options)
    d_scores = _scores_gradient(direct, gsum, th, scores, segments, cfg)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_scores.astype(scores_dtype.dtype), None)


_attention.defvjp(_attention_fwd, _attention_bwd)
# Called outside jit, the forward and the backward each compile as one program (not operation by operation).
_compiled_attention = jax.jit(_attention, static_argnums=(5,))


def _current_mesh_axes(axes: MeshAxes | None):
    """The axes to split over inside the current mesh (``jax.set_mesh``), or None when there is nothing to split."""
    if axes is None or (axes.batch is None and axes.heads is None):
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    names = set(mesh.axis_names)
    batch = axes.batch if isinstance(axes.batch, tuple) else (() if axes.batch is None else (axes.batch,))
    batch = tuple(a for a in batch if a in names and mesh.shape[a] > 1)
    heads = axes.heads if axes.heads in names and mesh.shape[axes.heads] > 1 else None
    if not batch and heads is None:
        return None
    return (batch or None), heads, mesh


def blocked_attention(q, k, v, scores, segments, *, topk: int, window: int, gate: str, scale: float,
                      implementation: str, block_sizes: BlockSizes, buffer_size: int, interpret: bool,
                      mesh_axes: MeshAxes | None = None):
    """The blocked SparseK attention (arguments as in ``sparsek_attention``, validated; ``segments`` an int32
    array; ``block_sizes`` resolved for ``implementation``)."""
    cfg = _Config(topk, window, gate, float(scale), implementation, block_sizes, buffer_size, interpret)
    split = _current_mesh_axes(mesh_axes)
    if split is None:
        return _compiled_attention(q, k, v, scores, segments, cfg)
    batch, heads, mesh = split
    for name, size, axis in (("q", q.shape[0], batch), ("k", k.shape[2], heads and (heads,))):
        devices = math.prod(mesh.shape[a] for a in axis or ())
        if size % devices:
            what = "batch" if name == "q" else "kv_heads"
            raise ValueError(f"{name}: expected {what} to be a multiple of the {devices} devices of mesh axes "
                             f"{axis}, received {size}")
    heads_spec = PartitionSpec(batch, None, heads, None)
    rows_spec = PartitionSpec(batch, None, heads)
    run = jax.shard_map(lambda q, k, v, u, s: _compiled_attention(q, k, v, u, s, cfg), mesh=mesh,
                        in_specs=(heads_spec, heads_spec, heads_spec, rows_spec, PartitionSpec(batch, None)),
                        out_specs=heads_spec, check_vma=False)
    return run(q, k, v, scores, segments)
