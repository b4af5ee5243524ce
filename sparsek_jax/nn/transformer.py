"""Transformer block and decoder-only language model (Flax NNX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsek_jax.nn.attention import SparseKAttention
from sparsek_jax.nn.config import ModelConfig
from sparsek_jax.nn.params import param

__all__ = ["RMSNorm", "GatedMLP", "TransformerBlock", "TransformerLM", "cache_nbytes"]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("embed",), param_dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class GatedMLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, init = config, nnx.initializers.lecun_normal()
        self.dtype = c.compute_dtype
        self.gate = param(rngs, init, (c.d_model, c.mlp_dim), ("embed", "mlp"), c.param_dtype)
        self.up = param(rngs, init, (c.d_model, c.mlp_dim), ("embed", "mlp"), c.param_dtype)
        self.down = param(rngs, init, (c.mlp_dim, c.d_model), ("mlp", "embed"), c.param_dtype)

    def __call__(self, x):
        x = x.astype(self.dtype)
        hidden = jax.nn.silu(x @ self.gate[...].astype(self.dtype)) * (x @ self.up[...].astype(self.dtype))
        return hidden @ self.down[...].astype(self.dtype)


class TransformerBlock(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``+ mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        c = config
        self.attention_norm = RMSNorm(c.d_model, eps=c.norm_eps, param_dtype=c.param_dtype, rngs=rngs)
        self.attention = SparseKAttention(config, kind, rngs=rngs)
        self.mlp_norm = RMSNorm(c.d_model, eps=c.norm_eps, param_dtype=c.param_dtype, rngs=rngs)
        self.mlp = GatedMLP(config, rngs=rngs)

    def __call__(self, x, positions, segment_ids=None, *, mode: str = "attend"):
        """``mode`` as in ``SparseKAttention``: with ``"scores"`` or ``"teacher"`` returns ``(x, extra)``."""
        attended = self.attention(self.attention_norm(x), positions, segment_ids, mode=mode)
        attended, extra = attended if mode != "attend" else (attended, None)
        x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        return x if mode == "attend" else (x, extra)

    def prefill(self, x, positions, cache):
        attended, cache = self.attention.prefill(self.attention_norm(x), positions, cache)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), cache

    def decode_step(self, x, cache):
        attended, cache = self.attention.decode_step(self.attention_norm(x), cache)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), cache


class TransformerLM(nnx.Module):
    """Decoder-only LM: ``TransformerLM(config, rngs=nnx.Rngs(0))(tokens)`` maps int32 ``[batch, seq]`` to
    logits ``[batch, seq, vocab]``.

    Decoding: ``cache = model.init_cache(batch)``, ``logits, cache = model.prefill(tokens, cache)`` (logits of
    every prompt position), ``logits, cache = model.decode_step(token, cache)`` (token ``[batch]``, logits
    ``[batch, vocab]``). With ``scan_layers`` the blocks are stacked on a leading ``layers`` axis and run under
    ``nnx.scan`` (the caches too), so deep models compile once per block.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        # std 1/sqrt(d_model): scaled by sqrt(d_model) on input, embeddings enter the residual at unit scale,
        # and the tied output gives every token, the input token included, a logit of O(1) at initialisation
        # (with std 1 the input token would get a logit of sqrt(d_model) and the initial loss would exceed ln V).
        self.embed = param(rngs, nnx.initializers.normal(c.d_model ** -0.5), (c.vocab_size, c.d_model),
                           ("vocab", "embed"), c.param_dtype)
        if c.scan_layers:
            kind = c.layer_kinds[0]

            @nnx.split_rngs(splits=c.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(rngs):
                return TransformerBlock(config, kind, rngs=rngs)

            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([TransformerBlock(config, kind, rngs=rngs) for kind in c.layer_kinds])
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, param_dtype=c.param_dtype, rngs=rngs)
        self.unembed = None if c.tie_embeddings else param(
            rngs, nnx.initializers.lecun_normal(), (c.d_model, c.vocab_size), ("embed", "vocab"), c.param_dtype)

    def _embed(self, tokens, rank: int):
        """Embeddings and the validity of each token id. An id outside ``[0, vocab_size)`` embeds as zeros and
        its position's logits are NaN (no other position sees it: it is never looked up)."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != rank or not jnp.issubdtype(tokens.dtype, jnp.integer):
            layout = "[batch, seq]" if rank == 2 else "[batch]"
            raise ValueError(f"tokens: expected an integer array {layout}, received shape {tokens.shape} "
                             f"dtype {tokens.dtype}")
        valid = (tokens >= 0) & (tokens < self.config.vocab_size)
        x = jnp.take(self.embed[...], jnp.where(valid, tokens, 0), axis=0).astype(self.config.compute_dtype)
        x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
        return x * jnp.asarray(self._embedding_scale, x.dtype), valid

    @property
    def _embedding_scale(self) -> float:
        return self.config.d_model ** 0.5 if self.config.scale_embeddings else 1.0

    def _logits(self, x, valid):
        x = self.final_norm(x).astype(self.config.compute_dtype)
        if self.unembed is None:
            w = self.embed[...].astype(x.dtype).T / jnp.asarray(self._embedding_scale, x.dtype)
        else:
            w = self.unembed[...].astype(x.dtype)
        return jnp.where(valid[..., None], (x @ w).astype(jnp.float32), jnp.nan)

    def _block_fn(self, mode: str):
        """A block's forward, rematerialised with the configured ``jax.checkpoint`` policy."""
        def run(block, x, positions, segment_ids):
            return block(x, positions, segment_ids, mode=mode)

        if self.config.remat == "none":
            return run
        return nnx.remat(run, policy=getattr(jax.checkpoint_policies, self.config.remat))

    def _forward(self, tokens, positions, segment_ids, mode: str):
        """Logits and, unless ``mode == "attend"``, every layer's extra output (a tuple; stacked on a leading
        layer axis with ``scan_layers``)."""
        x, valid = self._embed(tokens, 2)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        run = self._block_fn(mode)
        if self.config.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry if mode == "attend" else (nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def scan_blocks(block, x):
                return run(block, x, positions, segment_ids)

            out = scan_blocks(self.blocks, x)
            x, extra = (out, None) if mode == "attend" else out
        else:
            extra = []
            for block in self.blocks:
                out = run(block, x, positions, segment_ids)
                x, layer_extra = (out, None) if mode == "attend" else out
                extra.append(layer_extra)
            extra = tuple(extra)
        return self._logits(x, valid), extra

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, return_scores: bool = False):
        """tokens int ``[batch, seq]`` -> logits float32 ``[batch, seq, vocab]``. ``positions`` default to
        ``0..seq-1`` (restart them per document for packed inputs); ``segment_ids`` separate documents.

        With ``return_scores`` returns ``(logits, scores)``: per layer the key scores ``[batch, seq, kv_heads]``
        of a ``sparsek`` layer, None for other kinds (a tuple; with ``scan_layers`` one array stacked on a leading
        layer axis, or None). They show what each layer selects (``sparsek_jax.diagnostics``)."""
        logits, scores = self._forward(tokens, positions, segment_ids, "scores" if return_scores else "attend")
        return (logits, scores) if return_scores else logits

    def teacher_forward(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                        segment_ids: jax.Array | None = None):
        """The model with its ``sparsek`` layers attending densely: ``(logits, loss)``, ``loss`` the sum over
        those layers of their scorers' distillation loss against the dense attention (it reaches only the
        scorers). Warm-up steps that train the model densely and teach the scorers which keys it reads
        (``train.scorer_distill_steps``)."""
        logits, losses = self._forward(tokens, positions, segment_ids, "teacher")
        return logits, jnp.sum(jnp.stack(losses)) if isinstance(losses, tuple) else jnp.sum(losses)

    # -- decoding ---------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int):
        """Per-layer caches (a tuple, or one cache stacked on a leading layer axis with ``scan_layers``)."""
        if self.config.scan_layers:
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(block):
                return block.attention.init_cache(batch_size)

            return stacked(self.blocks)
        return tuple(block.attention.init_cache(batch_size) for block in self.blocks)

    def _run_layers(self, method: str, x, cache, *args):
        if self.config.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def scan_blocks(block, x, layer_cache):
                return getattr(block, method)(x, *args, layer_cache)

            return scan_blocks(self.blocks, x, cache)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = getattr(block, method)(x, *args, layer_cache)
            new_cache.append(layer_cache)
        return x, tuple(new_cache)

    def prefill(self, tokens: jax.Array, cache):
        """Runs the prompt ``[batch, n]`` through the model and fills the (empty) cache: returns the logits of
        every prompt position ``[batch, n, vocab]`` and the cache."""
        x, valid = self._embed(tokens, 2)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x, cache = self._run_layers("prefill", x, cache, positions)
        return self._logits(x, valid), cache

    def decode_step(self, token: jax.Array, cache):
        """The next token ``[batch]`` -> its logits ``[batch, vocab]`` and the updated cache."""
        x, valid = self._embed(token, 1)
        x, cache = self._run_layers("decode_step", x, cache)
        return self._logits(x, valid), cache


def cache_nbytes(cache) -> int:
    """Bytes held by a model's cache (any nesting of ``AttentionCache``)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))

