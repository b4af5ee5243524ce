"""Argument checks shared by the public functions.

Every failure is a ``ValueError`` that names the argument, what was expected and what was received, so
that a user who passes ``[batch, heads, seq, dim]`` instead of ``[batch, seq, heads, dim]`` sees which
argument is wrong and why without reading our code.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

GATES = ("value", "logit", "none")
IMPLEMENTATIONS = ("reference", "xla", "pallas_gpu", "pallas_tpu", "auto")


def check_rank(name: str, x, rank: int, layout: str) -> None:
    if np.ndim(x) != rank:
        raise ValueError(
            f"{name}: expected a rank-{rank} array {layout}, received shape {tuple(np.shape(x))}"
        )


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def check_float(name: str, x) -> None:
    dtype = _dtype(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating-point array, received dtype {dtype}")


def check_nonnegative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected a non-negative Python int, received {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative int, received {value}")
    return int(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, received {value!r}")
    return value


def check_same_shape(name: str, x, expected_shape: tuple[int, ...], layout: str) -> None:
    if tuple(np.shape(x)) != tuple(expected_shape):
        raise ValueError(
            f"{name}: expected shape {tuple(expected_shape)} {layout}, received {tuple(np.shape(x))}"
        )


def check_attention_inputs(q, k, v, scores, segment_ids) -> tuple[int, int, int, int, int]:
    """Checks the shapes of ``sparsek_attention``'s arrays; returns (batch, seq, q_heads, kv_heads, head_dim)."""
    check_rank("q", q, 4, "[batch, seq, q_heads, head_dim]")
    check_rank("k", k, 4, "[batch, seq, kv_heads, head_dim]")
    check_rank("v", v, 4, "[batch, seq, kv_heads, head_dim]")
    check_rank("scores", scores, 3, "[batch, seq, kv_heads]")
    for name, x in (("q", q), ("k", k), ("v", v), ("scores", scores)):
        check_float(name, x)
    batch, seq, q_heads, head_dim = np.shape(q)
    kv_shape = np.shape(k)
    if kv_shape[0] != batch or kv_shape[1] != seq or kv_shape[3] != head_dim:
        raise ValueError(
            f"k: expected shape ({batch}, {seq}, kv_heads, {head_dim}) to match q's batch, seq and head_dim, "
            f"received {tuple(kv_shape)}"
        )
    kv_heads = kv_shape[2]
    check_same_shape("v", v, kv_shape, "(the shape of k)")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(
            f"q: expected q_heads to be a multiple of kv_heads={kv_heads} (grouped-query attention), "
            f"received q_heads={q_heads}"
        )
    check_same_shape("scores", scores, (batch, seq, kv_heads), "[batch, seq, kv_heads]")
    check_segment_ids(segment_ids, batch, seq)
    return batch, seq, q_heads, kv_heads, head_dim


def check_segment_ids(segment_ids, batch: int, seq: int) -> None:
    if segment_ids is None:
        return
    check_same_shape("segment_ids", segment_ids, (batch, seq), "[batch, seq]")
    dtype = _dtype(segment_ids)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"segment_ids: expected an integer array, received dtype {dtype}")


def check_selection_args(scores, topk, window, segment_ids) -> tuple[int, int]:
    """Checks ``scores [batch, seq, kv_heads]``, ``topk``, ``window`` and ``segment_ids``; returns (topk, window)."""
    check_rank("scores", scores, 3, "[batch, seq, kv_heads]")
    check_float("scores", scores)
    topk = check_nonnegative_int("topk", topk)
    window = check_nonnegative_int("window", window)
    batch, seq, _ = np.shape(scores)
    check_segment_ids(segment_ids, batch, seq)
    return topk, window


def resolve_implementation(implementation: str, choices: Sequence[str] = IMPLEMENTATIONS) -> str:
    """Checks ``implementation`` against ``choices``; ``"auto"`` becomes the kernels of the default backend
    (``pallas_gpu`` on GPUs, ``pallas_tpu`` on TPUs) where they are among the choices, else ``xla``."""
    check_choice("implementation", implementation, choices)
    if implementation != "auto":
        return implementation
    best = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "xla")
    return best if best in choices else "xla"
