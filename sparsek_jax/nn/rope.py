"""Rotary position embeddings (RoPE), as a pure function."""

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10_000.0) -> jax.Array:
    """Rotates ``x`` ``[batch, seq, heads, head_dim]`` by the angles of ``positions`` ``[batch, seq]``
    (half-split convention: pairs are ``(x[..., i], x[..., i + head_dim / 2])``)."""
    half = x.shape[-1] // 2
    frequencies = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None, None] * frequencies  # [batch, seq, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
