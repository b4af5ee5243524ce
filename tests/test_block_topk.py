import jax
import jax.numpy as jnp
import numpy as np
import pytest

from builders import assert_matches_reference, random_qkv, random_segments
from oracles import block_topk_attention_np
from sparsek_jax.block_topk import block_topk_attention


def dyadic(rng, shape):
    """Halves in [-1, 1]: sums and dot products of a few of them are exact in float32, so block scores that are
    equal in exact arithmetic are equal bit for bit on every path (exact ties)."""
    return jnp.asarray(rng.integers(-2, 3, size=shape) / 2, jnp.float32)


def inputs(rng, seq, q_heads, kv_heads, *, keys="normal", segmented=False, batch=2, dim=8):
    """q, k, v and segment ids (or None). keys: "normal", "ties" (dyadic q and k) or "identical" (one dyadic key
    per KV head at every position: all eligible blocks of a query tie)."""
    q, k, v = random_qkv(rng, batch, seq, q_heads, kv_heads, dim)
    if keys == "ties":
        q, k = dyadic(rng, q.shape), dyadic(rng, k.shape)
    elif keys == "identical":
        q, k = dyadic(rng, q.shape), jnp.broadcast_to(dyadic(rng, (batch, 1, kv_heads, dim)), k.shape)
    return q, k, v, random_segments(rng, batch, seq) if segmented else None


def value_and_grads(attention, q, k, v, cotangent):
    """``attention(q, k, v)`` and its gradients with respect to all three for the output cotangent, jitted."""
    def run(q, k, v):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(cotangent)
    return jax.jit(run)(q, k, v)


CASES = [  # (seq, q_heads, kv_heads, topk, window, block_size, keys, segmented)
    (45, 4, 2, 12, 0, 4, "normal", False),     # GQA 4:2, window 0, seq not a multiple of block_size
    (41, 4, 1, 10, 3, 5, "normal", True),      # GQA 4:1, packed documents
    (40, 2, 1, 0, 6, 8, "normal", True),       # topk 0: the window only
    (39, 2, 2, 200, 2, 8, "normal", True),     # topk larger than every prefix
    (48, 4, 2, 16, 5, 4, "ties", True),        # exact ties between block scores
    (44, 2, 2, 16, 3, 8, "identical", False),  # every eligible block ties: the oldest ones win
    (37, 4, 2, 6, 2, 1, "normal", True),       # block_size 1: per-key top-k
    (50, 2, 1, 24, 3, 12, "normal", False),    # block_size > window
    (33, 2, 2, 8, 40, 8, "normal", False),     # window longer than the sequence
    (29, 2, 2, 64, 2, 64, "normal", True),     # one block, larger than the sequence
]


@pytest.mark.parametrize("seq, q_heads, kv_heads, topk, window, block_size, keys, segmented", CASES)
def test_xla_matches_reference(rng, seq, q_heads, kv_heads, topk, window, block_size, keys, segmented):
    q, k, v, seg = inputs(rng, seq, q_heads, kv_heads, keys=keys, segmented=segmented)
    cotangent = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    run = lambda implementation: value_and_grads(
        lambda q, k, v: block_topk_attention(q, k, v, topk=topk, window=window, block_size=block_size,
                                             segment_ids=seg, implementation=implementation),
        q, k, v, cotangent)
    assert_matches_reference(run("xla"), run("reference"), atol=1e-5, grad_atol=2e-5)


ORACLE_CASES = [  # (seq, q_heads, kv_heads, topk, window, block_size, keys, segmented)
    (37, 4, 2, 12, 3, 5, "normal", True),
    (40, 2, 1, 16, 0, 4, "ties", False),
    (33, 2, 2, 5, 2, 1, "normal", False),
    (35, 4, 1, 16, 4, 8, "identical", True),
]


@pytest.mark.parametrize("seq, q_heads, kv_heads, topk, window, block_size, keys, segmented", ORACLE_CASES)
def test_reference_matches_loop_oracle(rng, seq, q_heads, kv_heads, topk, window, block_size, keys, segmented):
    q, k, v, seg = inputs(rng, seq, q_heads, kv_heads, keys=keys, segmented=segmented)
    options = dict(topk=topk, window=window, block_size=block_size, segment_ids=seg)
    out = block_topk_attention(q, k, v, **options, implementation="reference")
    np.testing.assert_allclose(np.asarray(out), block_topk_attention_np(q, k, v, **options), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("topk, window", [(0, 5), (7, 1)])  # 7 < block_size: no block fits the budget
def test_sliding_window_reduction(rng, implementation, topk, window):
    q, k, v = random_qkv(rng, 2, 37, 4, 2, 8)
    out = block_topk_attention(q, k, v, topk=topk, window=window, block_size=8, implementation=implementation)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window - 1, 0))
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("seq, topk, window", [(40, 40, 0), (37, 40, 3), (37, 1000, 0)])
def test_dense_causal_reduction(rng, implementation, seq, topk, window):
    q, k, v = random_qkv(rng, 2, seq, 4, 2, 8)
    out = block_topk_attention(q, k, v, topk=topk, window=window, block_size=8, implementation=implementation)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_block_size_one_is_per_key_topk(rng, implementation):
    seq, topk, window = 36, 5, 2
    q, k, v = random_qkv(rng, 1, seq, 4, 2, 8)
    qn, kn = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2)
    mask = np.zeros((1, 4, seq, seq), bool)
    for h in range(4):
        for i in range(seq):
            mask[0, h, i, max(0, i - window + 1): i + 1] = True
            older = np.arange(i - window + 1)
            ranked = older[np.argsort(-(kn[0, older, h] @ qn[0, i, h]), kind="stable")]
            mask[0, h, i, ranked[:topk]] = True
    out = block_topk_attention(q, k, v, topk=topk, window=window, block_size=1, implementation=implementation)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)), atol=1e-5)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_no_keys_outputs_zeros(rng, implementation):
    q, k, v = random_qkv(rng, 1, 20, 2, 1, 8)
    f = lambda q, k, v: block_topk_attention(q, k, v, topk=3, window=0, block_size=4, implementation=implementation)
    np.testing.assert_array_equal(f(q, k, v), 0.0)
    for grad in jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v):
        np.testing.assert_array_equal(grad, 0.0)


def test_packing_equals_separate_documents(rng):
    lengths = [11, 17, 6]
    q, k, v = random_qkv(rng, 1, sum(lengths), 4, 2, 8)
    seg = jnp.asarray(np.repeat(np.arange(3), lengths)[None], jnp.int32)
    options = dict(topk=8, window=3, block_size=4)
    packed = block_topk_attention(q, k, v, segment_ids=seg, **options)
    start = 0
    for n in lengths:
        piece = slice(start, start + n)
        # Blocks are cut from the start of the row, so a document that starts mid-block sees other block
        # boundaries alone; the two agree only when the cuts agree, as they do for a start at a multiple of 4.
        if start % 4 == 0:
            alone = block_topk_attention(q[:, piece], k[:, piece], v[:, piece], **options)
            np.testing.assert_allclose(packed[:, piece], alone, atol=1e-6)
        start += n
    later = lambda x: x.at[:, lengths[0]:].set(jnp.asarray(rng.normal(size=x[:, lengths[0]:].shape), x.dtype))
    replaced = block_topk_attention(q, later(k), later(v), segment_ids=seg, **options)
    np.testing.assert_array_equal(packed[:, :lengths[0]], replaced[:, :lengths[0]])


def test_causality(rng):
    seq, cut = 40, 19
    q, k, v = random_qkv(rng, 1, seq, 2, 1, 8)
    f = lambda q, k, v: block_topk_attention(q, k, v, topk=8, window=2, block_size=4)
    later = lambda x: x.at[:, cut + 1:].set(jnp.asarray(rng.normal(size=x[:, cut + 1:].shape), x.dtype))
    out, out2 = f(q, k, v), f(later(q), later(k), later(v))
    np.testing.assert_array_equal(out[:, : cut + 1], out2[:, : cut + 1])
    assert not np.allclose(out[:, cut + 1:], out2[:, cut + 1:])


def test_jit_vmap_dtype(rng):
    q, k, v, seg = inputs(rng, 30, 4, 2, segmented=True)
    f = lambda q, k, v, s: block_topk_attention(q, k, v, topk=8, window=3, block_size=4, segment_ids=s)
    jitted = jax.jit(f)(q, k, v, seg)  # the segment ids are traced: no contiguity check, same documents
    mapped = jax.vmap(lambda *a: f(*(x[None] for x in a))[0])(q, k, v, seg)
    np.testing.assert_allclose(mapped, jitted, atol=1e-6)
    half = f(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), seg)
    assert half.dtype == jnp.bfloat16


def _shapes(jaxpr):
    """Every intermediate shape of a jaxpr, nested jaxprs (jit, custom rules) included."""
    for eqn in jaxpr.eqns:
        yield from (var.aval.shape for var in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _shapes(inner)


def test_xla_path_has_no_seq_by_seq_array(rng):
    seq = 64
    q, k, v = random_qkv(rng, 1, seq, 4, 2, 8)

    def square_shapes(implementation):
        f = lambda q, k, v: block_topk_attention(q, k, v, topk=16, window=4, block_size=8,
                                                 implementation=implementation)
        jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v).jaxpr
        return [s for s in _shapes(jaxpr) if sum(d >= seq for d in s) >= 2 or seq * seq in s]

    assert square_shapes("reference"), "the check sees the reference's [batch, heads, seq, seq] logits"
    assert square_shapes("xla") == []


BAD = [
    (dict(q=np.ones((2, 8, 4))), r"q: expected a rank-4 array \[batch, seq, q_heads, head_dim\], received shape \(2, 8, 4\)"),
    (dict(k=np.ones((2, 7, 2, 16))), r"k: expected shape \(2, 8, kv_heads, 16\)"),
    (dict(v=np.ones((2, 8, 2, 8))), r"v: expected shape \(2, 8, 2, 16\)"),
    (dict(q=np.ones((2, 8, 3, 16))), "q: expected q_heads to be a multiple of kv_heads=2.*received q_heads=3"),
    (dict(q=np.ones((2, 8, 4, 16), np.int32)), "q: expected a floating-point array, received dtype int32"),
    (dict(topk=-2), "topk: expected a non-negative int, received -2"),
    (dict(topk=2.0), r"topk: expected a non-negative Python int, received 2.0 \(float\)"),
    (dict(window=-1), "window: expected a non-negative int, received -1"),
    (dict(block_size=0), "block_size: expected a positive Python int, received 0"),
    (dict(block_size=None), "block_size: expected a positive Python int, received None"),
    (dict(scale=-1.0), "scale: expected a positive finite number, received -1.0"),
    (dict(implementation="pallas_gpu"), "implementation: expected one of 'xla', 'reference', received 'pallas_gpu'"),
    (dict(segment_ids=np.zeros((2, 9), np.int32)), r"segment_ids: expected shape \(2, 8\)"),
    (dict(segment_ids=np.zeros((2, 8), np.float32)), "segment_ids: expected an integer array, received dtype float32"),
    (dict(segment_ids=np.array([[0, 0, 1, 1, 0, 0, 2, 2]] * 2)), "segment_ids: expected contiguous runs"),
]


@pytest.mark.parametrize("override, match", BAD)
def test_bad_input(override, match):
    args = dict(q=np.ones((2, 8, 4, 16), np.float32), k=np.ones((2, 8, 2, 16), np.float32),
                v=np.ones((2, 8, 2, 16), np.float32), topk=4, window=2, block_size=2)
    args.update(override)
    with pytest.raises(ValueError, match=match):
        block_topk_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
