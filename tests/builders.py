"""Random inputs for the tests and the comparison every fast path makes against the reference."""

import os

import jax
import jax.numpy as jnp
import numpy as np


def cpu_devices_env(devices: int, **extra) -> dict:
    """The environment of a subprocess that sees ``devices`` CPU devices, keeping the session's XLA flags (the
    tests' compile level) and adding ``extra``."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **extra)


def write_text_corpus(root, documents: int, words_per_document: int):
    """``documents`` small ``.txt`` files of random words under ``root`` (a ``text_files`` corpus); returns
    ``root``. Fixed seed: every test that builds one reads the same texts."""
    rng = np.random.default_rng(0)
    words = "the state of the union is strong and congress shall make laws for the people of the nation".split()
    for i in range(documents):
        (root / f"d{i}.txt").write_text(" ".join(rng.choice(words, size=words_per_document)))
    return root


def random_qkv(rng, batch, seq, q_heads, kv_heads, dim, dtype=np.float32):
    shapes = ((batch, seq, q_heads, dim), (batch, seq, kv_heads, dim), (batch, seq, kv_heads, dim))
    return tuple(jnp.asarray(rng.normal(size=s).astype(dtype)) for s in shapes)


def random_scores(rng, batch, seq, heads, *, scale=1.0, ties=False, slope=0.0):
    """Gaussian scores ``[batch, seq, heads]`` times ``scale`` plus ``slope * position``; ``ties`` rounds them to
    halves (many exact ties)."""
    u = rng.normal(size=(batch, seq, heads)) * scale + slope * np.arange(seq)[None, :, None]
    if ties:
        u = np.round(u * 2) / 2
    return jnp.asarray(u.astype(np.float32))


def random_segments(rng, batch, seq, *, documents=3):
    """int32 ``[batch, seq]`` document ids 0, 1, ...: contiguous runs with random cuts per row."""
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=min(documents - 1, seq - 1), replace=False))
        rows.append(np.searchsorted(cuts, np.arange(seq), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)


def attention_inputs(rng, batch, seq, q_heads, kv_heads, dim, *, ties=False, segmented=False):
    """q, k, v, scores and segment ids (or None)."""
    q, k, v = random_qkv(rng, batch, seq, q_heads, kv_heads, dim)
    u = random_scores(rng, batch, seq, kv_heads, scale=1.5, ties=ties)
    return q, k, v, u, random_segments(rng, batch, seq) if segmented else None


def value_and_grads(attention, q, k, v, u, cotangent):
    """``attention(q, k, v, u)`` and its gradients with respect to all four, for the output cotangent, jitted."""
    def run(q, k, v, u):
        out, vjp = jax.vjp(attention, q, k, v, u)
        return out, vjp(cotangent)
    return jax.jit(run)(q, k, v, u)


def assert_matches_reference(got, want, *, atol=2e-5, grad_atol=5e-5):
    """``got`` and ``want`` are ``(out, (dq, dk, dv, dscores))`` pairs; float32 tolerances."""
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=atol, rtol=1e-5, err_msg="output")
    for name, g, w in zip(("dq", "dk", "dv", "dscores"), got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=grad_atol, rtol=1e-4, err_msg=name)
