"""Argument checks shared by the public functions.

Every failure is a ``ValueError`` that names the argument, what was expected and what was received, so
that a user who passes ``[batch, heads, seq, dim]`` instead of ``[batch, seq, heads, dim]`` sees which
argument is wrong and why without reading our code.
"""

from __future__ import annotations

import functools
import importlib.util
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

GATES = ("value", "logit", "none")
IMPLEMENTATIONS = ("reference", "xla", "pallas_gpu", "pallas_tpu", "triton", "auto")


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
    if head_dim < 1:
        raise ValueError(f"q: expected head_dim >= 1, received shape {tuple(np.shape(q))}")
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
    check_finite("scores", scores)
    check_segment_runs(segment_ids)
    return topk, window


def resolve_implementation(implementation: str, choices: Sequence[str] = IMPLEMENTATIONS) -> str:
    """Checks ``implementation`` against ``choices``; ``"auto"`` becomes the fastest kernels of the default
    backend among the choices: on GPUs ``triton`` where jax-triton is installed (the ``gpu`` and ``triton`` extras), else
    ``pallas_gpu``; on TPUs ``pallas_tpu``; ``xla`` elsewhere."""
    check_choice("implementation", implementation, choices)
    if implementation != "auto":
        return implementation
    preferred = {"gpu": ("triton", "pallas_gpu") if _has_jax_triton() else ("pallas_gpu",),
                 "tpu": ("pallas_tpu",)}.get(jax.default_backend(), ())
    return next((name for name in preferred if name in choices), "xla")


@functools.cache
def _has_jax_triton() -> bool:
    return importlib.util.find_spec("jax_triton") is not None


def is_concrete(x) -> bool:
    """Whether ``x`` holds values now (not a tracer under jit/vmap/grad), so that a check can read them."""
    return not isinstance(x, jax.core.Tracer)


def check_finite(name: str, x) -> None:
    """Non-finite entries of a concrete array are rejected (under a trace the callers make them loud: NaN)."""
    if not is_concrete(x):
        return
    values = np.asarray(x)
    bad = ~np.isfinite(values)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: expected finite values, received {int(bad.sum())} non-finite (first at index "
                         f"{first}: {values[first]})")


def check_segment_runs(segment_ids) -> None:
    """Document ids must be contiguous runs in each row (as packing produces): an id may not come back after
    another one. Checked on concrete arrays; under a trace every change of id starts a new document."""
    if segment_ids is None or not is_concrete(segment_ids):
        return
    ids = np.asarray(segment_ids)
    for row, values in enumerate(ids):
        starts = np.concatenate([[True], values[1:] != values[:-1]])
        run_ids = values[starts]
        if len(np.unique(run_ids)) != len(run_ids):
            seen, position = set(), 0
            for position, value in enumerate(values):
                if starts[position]:
                    if value in seen:
                        break
                    seen.add(value)
            raise ValueError(f"segment_ids: expected contiguous runs (each document id in one run per row), "
                             f"received id {values[position]} again at row {row}, position {position}")


def nonfinite_rows(scores):
    """bool ``[batch, kv_heads]``: the rows of ``scores [batch, seq, kv_heads]`` that break the finite-scores
    contract. The public functions return NaN for them, on every path."""
    return ~jnp.all(jnp.isfinite(jnp.asarray(scores, jnp.float32)), axis=1)


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite number, received {scale!r}")
    return float(scale)


def check_backend(implementation: str, interpret: bool) -> None:
    """The kernel paths compile for their own backend only; elsewhere they need interpret mode."""
    needs = {"pallas_gpu": "gpu", "pallas_tpu": "tpu", "triton": "gpu"}.get(implementation)
    if needs and not interpret and jax.default_backend() != needs:
        raise ValueError(f"implementation: {implementation!r} needs a {needs.upper()} (the default backend is "
                         f"{jax.default_backend()!r}); pass interpret=True to run its kernels in interpret mode, "
                         f"or implementation='auto'")
