import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sparsek_jax as sk
from builders import random_qkv as qkv, random_scores, random_segments
from oracles import sparsek_attention_np, topk_newest_first


REF = dict(implementation="reference")


ORACLE_CASES = [  # (seq, q_heads, kv_heads, topk, window, gate, ties, segmented)
    (21, 2, 2, 3, 4, "value", False, False),
    (19, 4, 2, 2, 0, "value", True, False),
    (23, 4, 1, 5, 3, "logit", False, True),
    (17, 2, 1, 4, 2, "none", True, False),
    (15, 3, 3, 30, 2, "value", False, False),   # topk larger than every candidate set
    (18, 2, 2, 0, 5, "value", False, True),     # topk = 0: sliding window only
    (20, 4, 2, 3, 25, "logit", False, False),   # window longer than the sequence
]


@pytest.mark.parametrize("seq, q_heads, kv_heads, topk, window, gate, ties, segmented", ORACLE_CASES)
def test_matches_loop_oracle(rng, seq, q_heads, kv_heads, topk, window, gate, ties, segmented):
    q, k, v = qkv(rng, 2, seq, q_heads, kv_heads, 8)
    u = random_scores(rng, 2, seq, kv_heads, scale=1.5, ties=ties)
    seg = random_segments(rng, 2, seq) if segmented else None
    out = sk.sparsek_attention(q, k, v, u, topk=topk, window=window, gate=gate, segment_ids=seg, **REF)
    expected = sparsek_attention_np(q, k, v, u, topk=topk, window=window, gate=gate, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("seq, q_heads, kv_heads, dim", [(33, 4, 4, 64), (31, 4, 2, 128), (29, 8, 2, 64)])
def test_dense_causal_reduction(rng, seq, q_heads, kv_heads, dim):
    q, k, v = qkv(rng, 2, seq, q_heads, kv_heads, dim)
    u = random_scores(rng, 2, seq, kv_heads, scale=1.5)
    out = sk.sparsek_attention(q, k, v, u, topk=seq, window=0, **REF)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("seq, q_heads, kv_heads, dim, window", [(33, 4, 2, 64, 5), (27, 2, 1, 128, 1)])
def test_sliding_window_reduction(rng, seq, q_heads, kv_heads, dim, window):
    q, k, v = qkv(rng, 1, seq, q_heads, kv_heads, dim)
    u = random_scores(rng, 1, seq, kv_heads, scale=1.5)
    out = sk.sparsek_attention(q, k, v, u, topk=0, window=window, **REF)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window - 1, 0))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_gate_none_is_hard_topk(rng):
    seq, topk, window = 30, 4, 3
    q, k, v = qkv(rng, 2, seq, 4, 2, 16)
    u = random_scores(rng, 2, seq, 2, scale=1.5, ties=True)
    mask = np.zeros((2, 2, seq, seq), bool)
    un = np.asarray(u)
    for b in range(2):
        for h in range(2):
            for i in range(seq):
                keys = set(range(max(0, i - window + 1), i + 1))
                keys |= topk_newest_first(un[b, :, h], range(i - window + 1), topk)
                mask[b, h, i, list(keys)] = True
    mask = np.repeat(mask, 2, axis=1)  # kv heads -> query heads
    expected = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask))
    out = sk.sparsek_attention(q, k, v, u, topk=topk, window=window, gate="none", **REF)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    hard = lambda s: sk.sparsek_attention(q, k, v, s, topk=topk, window=window, gate="none", **REF)
    grad_u = jax.grad(lambda s: hard(s).sum())(u)
    assert np.all(np.asarray(grad_u) == 0), "gate='none' gives the scorer no gradient"


@pytest.mark.parametrize("gate", ["value", "logit"])
def test_causality(rng, gate):
    seq, cut = 24, 11
    q, k, v = qkv(rng, 1, seq, 2, 1, 8)
    u = random_scores(rng, 1, seq, 1, scale=1.5)
    out = sk.sparsek_attention(q, k, v, u, topk=3, window=2, gate=gate, **REF)
    later = lambda x: x.at[:, cut + 1:].set(jnp.asarray(rng.normal(size=x[:, cut + 1:].shape), x.dtype))
    out2 = sk.sparsek_attention(later(q), later(k), later(v), later(u), topk=3, window=2, gate=gate, **REF)
    np.testing.assert_array_equal(out[:, : cut + 1], out2[:, : cut + 1])
    assert not np.allclose(out[:, cut + 1:], out2[:, cut + 1:])


def test_packing_equals_separate_documents(rng):
    lengths = [9, 14, 6]
    seq = sum(lengths)
    q, k, v = qkv(rng, 1, seq, 4, 2, 8)
    u = random_scores(rng, 1, seq, 2, scale=1.5)
    seg = jnp.asarray(np.repeat(np.arange(3), lengths)[None], jnp.int32)
    packed = sk.sparsek_attention(q, k, v, u, topk=3, window=2, segment_ids=seg, **REF)
    start = 0
    for n in lengths:
        piece = slice(start, start + n)
        alone = sk.sparsek_attention(q[:, piece], k[:, piece], v[:, piece], u[:, piece], topk=3, window=2,
                                     **REF)
        np.testing.assert_allclose(packed[:, piece], alone, atol=1e-6)
        start += n


def well_separated_scores(rng, seq, kv_heads):
    """Distinct scores 0.4 apart, so small finite-difference steps change neither selection nor gate pieces."""
    u = np.stack([rng.permutation(seq) * 0.4 + rng.uniform(-0.02, 0.02, seq) for _ in range(kv_heads)], -1)
    return jnp.asarray(u[None].astype(np.float32))


@pytest.mark.parametrize("gate", ["value", "logit"])
def test_gradients_finite_differences(rng, gate):
    seq = 14
    q, k, v = qkv(rng, 1, seq, 4, 2, 8)
    u = well_separated_scores(rng, seq, 2)
    f = lambda q, k, v, u: sk.sparsek_attention(q, k, v, u, topk=3, window=2, gate=gate, **REF)
    check_grads(f, (q, k, v, u), order=1, modes=("rev",), eps=1e-3, atol=2e-2, rtol=2e-2)
    grad_u = jax.grad(lambda s: jnp.sum(f(q, k, v, s) ** 2))(u)
    assert np.abs(np.asarray(grad_u)).max() > 0, "the scorer learns through the gates"


def test_jit_vmap_grad(rng):
    q, k, v = qkv(rng, 2, 16, 2, 1, 8)
    u = random_scores(rng, 2, 16, 1, scale=1.5)
    f = lambda q, k, v, u: sk.sparsek_attention(q, k, v, u, topk=3, window=2, **REF)
    eager = f(q, k, v, u)
    np.testing.assert_allclose(jax.jit(f)(q, k, v, u), eager, atol=1e-6)
    mapped = jax.vmap(lambda *a: f(*(x[None] for x in a))[0])(q, k, v, u)
    np.testing.assert_allclose(mapped, eager, atol=1e-6)
    grads = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2, 3)))(q, k, v, u)
    assert all(g.shape == x.shape for g, x in zip(grads, (q, k, v, u)))
    assert sk.sparsek_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), u,
                                topk=3, window=2, **REF).dtype == jnp.bfloat16


def test_pattern_shapes_and_window(rng):
    u = random_scores(rng, 2, 12, 3, scale=1.5)
    pattern = sk.attention_pattern(u, topk=2, window=3)
    assert pattern.window.shape == pattern.selected.shape == pattern.gates.shape == (2, 3, 12, 12)
    assert not np.any(np.asarray(pattern.window & pattern.selected))
    np.testing.assert_array_equal(np.asarray(pattern.gates)[np.asarray(pattern.window)], 1.0)


BAD = [
    (dict(q=np.ones((2, 8, 4))), r"q: expected a rank-4 array \[batch, seq, q_heads, head_dim\], received shape \(2, 8, 4\)"),
    (dict(k=np.ones((2, 7, 2, 16))), r"k: expected shape \(2, 8, kv_heads, 16\)"),
    (dict(v=np.ones((2, 8, 2, 8))), r"v: expected shape \(2, 8, 2, 16\)"),
    (dict(q=np.ones((2, 8, 3, 16))), "q: expected q_heads to be a multiple of kv_heads=2.*received q_heads=3"),
    (dict(scores=np.ones((2, 8, 4))), r"scores: expected shape \(2, 8, 2\) \[batch, seq, kv_heads\], received \(2, 8, 4\)"),
    (dict(topk=-2), "topk: expected a non-negative int, received -2"),
    (dict(window=-1), "window: expected a non-negative int, received -1"),
    (dict(gate="soft"), "gate: expected one of 'value', 'logit', 'none', received 'soft'"),
    (dict(implementation="cuda"), "implementation: expected one of .*received 'cuda'"),
    (dict(segment_ids=np.zeros((2, 9), np.int32)), r"segment_ids: expected shape \(2, 8\)"),
    (dict(q=np.ones((2, 8, 4, 16), np.int32)), "q: expected a floating-point array, received dtype int32"),
]


@pytest.mark.parametrize("override, match", BAD)
def test_bad_input(override, match):
    args = dict(q=np.ones((2, 8, 4, 16), np.float32), k=np.ones((2, 8, 2, 16), np.float32),
                v=np.ones((2, 8, 2, 16), np.float32), scores=np.ones((2, 8, 2), np.float32), topk=2, window=2)
    args.update(override)
    with pytest.raises(ValueError, match=match):
        sk.sparsek_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("scores"), **{**REF, **args})
