"""Rotary position embeddings (RoPE), as pure functions, with the frequency scalings of long-context Llama
checkpoints."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALING_KINDS = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How a checkpoint stretched its rotary frequencies beyond its original context.

    ``linear`` divides every frequency by ``factor`` (position interpolation). ``llama3`` divides only the
    low frequencies (wavelengths above ``original_max_position / low_freq_factor``) by ``factor``, keeps the
    high ones (wavelengths below ``original_max_position / high_freq_factor``) and interpolates in between,
    as Llama 3.1 and later do.
    """

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_SCALING_KINDS:
            raise ValueError(f"RopeScaling.kind: expected one of {ROPE_SCALING_KINDS}, received {self.kind!r}")
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"RopeScaling.{name}: expected a finite number > 0, received {value!r}")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"RopeScaling.high_freq_factor: expected more than low_freq_factor="
                             f"{self.low_freq_factor}, received {self.high_freq_factor}")


def rope_frequencies(head_dim: int, *, base: float = 10_000.0, scaling: RopeScaling | None = None) -> np.ndarray:
    """The ``head_dim / 2`` angular frequencies ``base ** (-2i / head_dim)``, scaled as ``scaling`` says
    (float64 numpy: they are constants of the program)."""
    half = head_dim // 2
    frequencies = base ** (-np.arange(half, dtype=np.float64) / half)
    if scaling is None:
        return frequencies
    if scaling.kind == "linear":
        return frequencies / scaling.factor
    wavelengths = 2 * np.pi / frequencies
    long_wavelength = scaling.original_max_position / scaling.low_freq_factor
    short_wavelength = scaling.original_max_position / scaling.high_freq_factor
    smooth = ((scaling.original_max_position / wavelengths - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    between = (1 - smooth) * frequencies / scaling.factor + smooth * frequencies
    scaled = np.where(wavelengths > long_wavelength, frequencies / scaling.factor, frequencies)
    return np.where((wavelengths >= short_wavelength) & (wavelengths <= long_wavelength), between, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10_000.0,
               scaling: RopeScaling | None = None) -> jax.Array:
    """Rotates ``x`` ``[batch, seq, heads, head_dim]`` by the angles of ``positions`` ``[batch, seq]``
    (half-split convention: pairs are ``(x[..., i], x[..., i + head_dim / 2])``, as in the Hugging Face
    layout of Llama-family checkpoints)."""
    frequencies = jnp.asarray(rope_frequencies(x.shape[-1], base=base, scaling=scaling), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None, None] * frequencies  # [batch, seq, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
