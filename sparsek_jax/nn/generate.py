"""Text generation with the constant-memory cache: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_token(logits: jax.Array, key: jax.Array, *, temperature: float, top_p: float) -> jax.Array:
    """One token per row of ``logits`` ``[batch, vocab]``: argmax when ``temperature == 0``, otherwise a
    sample from the smallest set of tokens whose probability reaches ``top_p``."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep tokens until the mass before them reaches top_p (the first token is always kept).
        keep = jnp.concatenate([jnp.ones_like(cumulative[:, :1], bool), cumulative[:, :-1] < top_p], axis=-1)
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p"))
def _generate(graphdef, state, prompt, key, *, max_new_tokens, temperature, top_p):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(prompt.shape[0])
    logits, cache = model.prefill(prompt, cache)
    first_key, key = jax.random.split(key)
    token = sample_token(logits[:, -1], first_key, temperature=temperature, top_p=top_p)

    def step(carry, step_key):
        token, cache, params = carry
        # The parameters ride in the carry and the model is merged inside the loop body: NNX graph nodes
        # must belong to the trace that uses them (scanned layers trace their own nnx.scan).
        logits, cache = nnx.merge(graphdef, params).decode_step(token, cache)
        next_token = sample_token(logits, step_key, temperature=temperature, top_p=top_p)
        return (next_token, cache, params), token

    (_, cache, _), tokens = jax.lax.scan(step, (token, cache, state), jax.random.split(key, max_new_tokens))
    return jnp.concatenate([prompt, tokens.T], axis=1), cache


def check_sampling(*, max_new_tokens, temperature, top_p) -> None:
    """The sampling options, checked before anything runs."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, received {max_new_tokens!r}")
    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a finite number >= 0, received {temperature!r}")
    if not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1], received {top_p!r}")


def generate(model, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             rng: jax.Array | None = None, return_cache: bool = False):
    """Continues ``prompt`` int ``[batch, n]`` by ``max_new_tokens`` tokens; returns ``[batch, n + new]``.

    One jit-compiled program: prefill, then a ``lax.scan`` of decode steps. SparseK and sliding layers use a
    cache whose size does not depend on the length; dense layers preallocate ``max_decode_length``.
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    prompt = np.asarray(prompt)
    c = model.config
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt: expected integer token ids [batch, n] with n >= 1, received shape {prompt.shape} "
                         f"dtype {prompt.dtype}")
    outside = (prompt < 0) | (prompt >= c.vocab_size)
    if outside.any():
        raise ValueError(f"prompt: expected token ids in [0, {c.vocab_size}), received {prompt[outside][0]} "
                         f"({int(outside.sum())} ids out of range)")
    if "dense" in c.layer_kinds and prompt.shape[1] + max_new_tokens > c.max_decode_length:
        raise ValueError(f"max_new_tokens: prompt ({prompt.shape[1]}) + new tokens ({max_new_tokens}) exceed the "
                         f"dense layers' cache (max_decode_length={c.max_decode_length})")
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if rng is None else rng
    tokens, cache = _generate(graphdef, state, jnp.asarray(prompt, jnp.int32), key, max_new_tokens=max_new_tokens,
                              temperature=float(temperature), top_p=float(top_p))
    return (tokens, cache) if return_cache else tokens
