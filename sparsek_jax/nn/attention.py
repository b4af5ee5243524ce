"""The attention layer: projections, GQA, RoPE, and one of three attention kinds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd

import sparsek_jax as sk
from sparsek_jax import kv_cache
from sparsek_jax.distillation import dense_teacher_attention
from sparsek_jax.nn.config import ModelConfig
from sparsek_jax.nn.params import param
from sparsek_jax.nn.rope import apply_rope
from sparsek_jax.nn.scoring import ScoringNetwork
from sparsek_jax.thresholds import resolve_buffer_size


# Logical names of the activations' batch and head axes: under ``nnx.logical_axis_rules`` that map them to mesh
# axes, the SparseK paths run per shard over those axes (``sk.MeshAxes``).
BATCH_AXIS = "activation_batch"
HEADS_AXIS = "activation_heads"


def mesh_axes() -> sk.MeshAxes | None:
    """The mesh axes of the activations' batch and heads under the current logical axis rules, if any."""
    rules = dict(spmd.get_logical_axis_rules() or ())
    if BATCH_AXIS not in rules and HEADS_AXIS not in rules:
        return None
    return sk.MeshAxes(batch=rules.get(BATCH_AXIS), heads=rules.get(HEADS_AXIS))


def dense_implementation(requested: str | None, dtype, head_dim: int, backend: str | None = None) -> str:
    """The ``jax.nn.dot_product_attention`` implementation of dense and sliding layers: ``requested``, or for
    None cuDNN where it runs (a GPU, 16-bit inputs, head_dim a multiple of 8 up to 128) and XLA elsewhere.
    JAX's own None is XLA's attention, which writes out every logit: on an H200 it made GPT-2-small training at
    8k tokens 4.6 times slower than cuDNN (docs/benchmarks.md)."""
    if requested is not None:
        return requested
    on_gpu = (backend or jax.default_backend()) == "gpu"
    sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if on_gpu and sixteen_bit and head_dim % 8 == 0 and head_dim <= 128 else "xla"


class SparseKAttention(nnx.Module):
    """Multi-head (GQA) causal self-attention whose kind is ``dense``, ``sliding``, ``sparsek`` or ``block_topk``.

    ``dense`` and ``sliding`` call ``jax.nn.dot_product_attention`` (cuDNN where available, with
    ``is_causal`` and ``local_window_size``); ``sparsek`` scores every key with a ``ScoringNetwork`` and calls
    ``sk.sparsek_attention``; ``block_topk`` (a baseline) calls ``sk.block_topk_attention``. Decoding keeps a
    constant-size cache for ``sliding`` and ``sparsek`` layers and a preallocated ``max_decode_length`` cache
    for ``dense`` ones (``sparsek_jax.kv_cache``); ``block_topk`` layers do not decode.
    """

    def __init__(self, config: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        self.config = config
        self.kind = kind
        c, init = config, nnx.initializers.lecun_normal()
        dtype = c.param_dtype
        self.q_proj = param(rngs, init, (c.d_model, c.num_heads, c.head_dim), ("embed", "q_heads", "head_dim"), dtype)
        self.k_proj = param(rngs, init, (c.d_model, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                            dtype)
        self.v_proj = param(rngs, init, (c.d_model, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"),
                            dtype)
        out_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        self.o_proj = param(rngs, out_init, (c.num_heads, c.head_dim, c.d_model), ("q_heads", "head_dim", "embed"),
                            dtype)
        zeros = nnx.initializers.zeros_init()
        self.q_bias, self.k_bias, self.v_bias = (
            (param(rngs, zeros, (c.num_heads, c.head_dim), ("q_heads", "head_dim"), dtype),
             param(rngs, zeros, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), dtype),
             param(rngs, zeros, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), dtype))
            if c.qkv_bias else (None, None, None))
        self.o_bias = param(rngs, zeros, (c.d_model,), ("embed",), dtype) if c.out_bias else None
        self.scorer = (ScoringNetwork(c.d_model, c.num_kv_heads, position_slope=c.position_slope, param_dtype=dtype,
                                      rngs=rngs, init_std=c.scorer_init_std) if kind == "sparsek" else None)

    @property
    def scale(self) -> float:
        return 1.0 / float(self.config.head_dim) ** 0.5

    def _project(self, x, positions):
        c, dtype = self.config, self.config.compute_dtype
        x = x.astype(dtype)

        def projection(weight, bias):
            y = jnp.einsum("bsm,mhd->bshd", x, weight[...].astype(dtype))
            return y if bias is None else y + bias[...].astype(dtype)

        q = projection(self.q_proj, self.q_bias)
        k = projection(self.k_proj, self.k_bias)
        v = projection(self.v_proj, self.v_bias)
        q = apply_rope(q, positions, base=c.rope_base, scaling=c.rope_scaling)
        k = apply_rope(k, positions, base=c.rope_base, scaling=c.rope_scaling)
        u = self.scorer(x, positions) if self.scorer is not None else None
        return q, k, v, u

    def _output(self, attended):
        dtype = self.config.compute_dtype
        out = jnp.einsum("bshd,hdm->bsm", attended.astype(dtype), self.o_proj[...].astype(dtype))
        return out if self.o_bias is None else out + self.o_bias[...].astype(dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None, *,
                 mode: str = "attend"):
        """x ``[batch, seq, d_model]``, positions ``[batch, seq]`` int, segment_ids ``[batch, seq]`` or None ->
        ``[batch, seq, d_model]``. ``mode``: ``"attend"`` returns the output alone; ``"scores"`` also the key
        scores ``[batch, seq, kv_heads]`` of a ``sparsek`` layer (None for other kinds), for diagnostics;
        ``"teacher"``: a ``sparsek`` layer attends densely and also returns its scorer's distillation loss
        against that attention (``sparsek_jax.distillation``; 0 for other kinds)."""
        q, k, v, u = self._project(x, positions)
        if mode == "scores":
            return self._attend(q, k, v, u, segment_ids), u
        if mode == "teacher":
            if self.kind != "sparsek":
                return self._attend(q, k, v, u, segment_ids), jnp.zeros((), jnp.float32)
            # The loss trains the scorer alone: its input is held fixed.
            u = self.scorer(jax.lax.stop_gradient(x), positions)
            out, loss = dense_teacher_attention(q, k, v, u, window=self.config.window, segment_ids=segment_ids,
                                                scale=self.scale)
            return self._output(out), loss
        return self._attend(q, k, v, u, segment_ids)

    def _attend(self, q, k, v, u, segment_ids):
        c = self.config
        if self.kind == "sparsek":
            out = sk.sparsek_attention(q, k, v, u, topk=c.topk, window=c.window, gate=c.gate, segment_ids=segment_ids,
                                       scale=self.scale, implementation=c.implementation, block_sizes=c.block_sizes,
                                       buffer_size=c.buffer_size, interpret=c.interpret, mesh_axes=mesh_axes())
        elif self.kind == "block_topk":
            out = sk.block_topk_attention(q, k, v, topk=c.topk, window=c.window, block_size=c.topk_block_size,
                                          segment_ids=segment_ids, scale=self.scale)
        else:
            mask = None
            if segment_ids is not None:  # packed documents: no attention across them
                mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, scale=self.scale, is_causal=True,
                local_window_size=(c.window - 1, 0) if self.kind == "sliding" else None,
                implementation=dense_implementation(c.dense_implementation, q.dtype, c.head_dim))
        return self._output(out)

    # -- decoding ---------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int) -> kv_cache.AttentionCache:
        c = self.config
        if self.kind == "block_topk":
            raise ValueError("attention: 'block_topk' layers have no decoding cache (they are a training and "
                             "evaluation baseline); generate with dense, sliding or sparsek layers")
        ring = {"dense": c.max_decode_length, "sliding": c.window, "sparsek": c.window}[self.kind]
        topk = c.topk if self.kind == "sparsek" else 0
        extra = 0
        if topk:
            buffer = resolve_buffer_size(c.buffer_size, topk=topk, seq=c.max_decode_length)
            extra = max(buffer - topk, 0)
        return kv_cache.empty_cache(batch_size, ring=ring, topk=topk, extra=extra, kv_heads=c.num_kv_heads,
                                    head_dim=c.head_dim, dtype=c.compute_dtype)

    def prefill(self, x, positions, cache: kv_cache.AttentionCache):
        """Full-sequence forward over a prompt that also fills ``cache`` (which must be empty)."""
        if self.kind == "dense" and x.shape[1] > self.config.max_decode_length:
            raise ValueError(f"prompt: expected at most max_decode_length={self.config.max_decode_length} tokens "
                             f"for a dense layer's cache, received {x.shape[1]}")
        q, k, v, u = self._project(x, positions)
        return self._attend(q, k, v, u, None), kv_cache.prefill_cache(cache, k, v, u)

    def decode_step(self, x, cache: kv_cache.AttentionCache):
        """One token: x ``[batch, d_model]`` at position ``cache.length``; returns ``([batch, d_model], cache)``."""
        positions = jnp.broadcast_to(cache.length, (x.shape[0], 1))
        q, k, v, u = self._project(x[:, None], positions)
        position = cache.length
        cache = kv_cache.append_token(cache, k[:, 0], v[:, 0], None if u is None else u[:, 0])
        out, cache = kv_cache.attend(cache, q[:, 0], scale=self.scale, gate=self.config.gate)
        if self.kind == "dense":  # past its preallocated cache a dense layer would silently slide: NaN instead
            out = jnp.where(position >= self.config.max_decode_length, jnp.asarray(jnp.nan, out.dtype), out)
        return self._output(out[:, None])[:, 0], cache
