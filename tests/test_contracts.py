"""Input contracts of the functional core and the model: what is rejected, and what comes out under a trace
(where nothing can be rejected) -- never a silently wrong number."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparsek_jax as sk
import sparsek_jax.nn as sknn
from builders import attention_inputs, random_scores
from oracles import sparsek_attention_np

IMPLEMENTATIONS = [("reference", {}), ("xla", {}), ("pallas_gpu", {"interpret": True})]


def attention(implementation, extra, **options):
    """The jitted attention; document ids are an argument (not a constant of the program), so tests of the same
    shapes share one compiled program."""
    return jax.jit(lambda q, k, v, u, segment_ids=None: sk.sparsek_attention(
        q, k, v, u, implementation=implementation, segment_ids=segment_ids, block_sizes=sk.BlockSizes(block_q=8),
        **options, **extra))


# The shapes (batch, seq, q_heads, kv_heads, head_dim) and options of the tests below that run every path: one
# compiled program per path for all of them.
SHAPE = (2, 30, 4, 2, 8)
OPTIONS = dict(topk=3, window=2)
ONE_DOCUMENT = jnp.zeros(SHAPE[:2], jnp.int32)


@pytest.mark.parametrize("bad", [-np.inf, np.inf, np.nan])
def test_non_finite_scores(rng, bad):
    q, k, v, u, _ = attention_inputs(rng, *SHAPE)
    u = u.at[1, 3, 0].set(bad)  # row (batch 1, kv head 0); topk larger than the early prefixes
    with pytest.raises(ValueError, match=r"scores: expected finite values, received 1 non-finite \(first at index "
                                         r"\(1, 3, 0\)"):
        sk.sparsek_attention(q, k, v, u, **OPTIONS)
    for fn in (sk.prefix_thresholds, sk.attention_pattern):
        with pytest.raises(ValueError, match="scores: expected finite values"):
            fn(u, **OPTIONS)
    # Under jit every implementation marks that row's query heads (0 and 1) NaN and leaves the rest exact.
    outs = [np.asarray(attention(impl, extra, **OPTIONS)(q, k, v, u, ONE_DOCUMENT))
            for impl, extra in IMPLEMENTATIONS]
    clean = attention("reference", {}, **OPTIONS)(q, k, v, u.at[1, 3, 0].set(0.0), ONE_DOCUMENT)
    for out in outs:
        assert np.isnan(out[1, :, :2]).all() and np.isfinite(out[1, :, 2:]).all() and np.isfinite(out[0]).all()
        np.testing.assert_allclose(out[0], clean[0], atol=2e-5)
    tau, theta = jax.jit(lambda u: sk.prefix_thresholds(u, **OPTIONS))(u)
    assert np.isnan(tau[1, :, 0]).all() and np.isnan(theta[1, :, 0]).all() and not np.isnan(tau[0]).any()


@pytest.mark.parametrize("outlier", [1e6, 1e9, -1e9])
def test_large_scores_agree_on_every_path(rng, outlier):
    # Gates are float32 differences from tau, so they stay accurate as long as the keys near tau are of
    # ordinary size; a far outlier (a key that always wins, or never does) must not disturb the others.
    q, k, v, u, seg = attention_inputs(rng, *SHAPE, segmented=True)
    u = u.at[0, 4, 0].set(outlier)
    expected = sparsek_attention_np(q, k, v, u, segment_ids=seg, **OPTIONS)
    for impl, extra in IMPLEMENTATIONS:
        out = attention(impl, extra, **OPTIONS)(q, k, v, u, seg)
        np.testing.assert_allclose(np.asarray(out), expected, atol=5e-5, err_msg=impl)


def test_document_ids_are_runs(rng):
    q, k, v, u, _ = attention_inputs(rng, *SHAPE)
    back = jnp.asarray([[0] * 10 + [1] * 10 + [0] * 10, [0] * 30], jnp.int32)  # document 0 comes back in row 0
    with pytest.raises(ValueError, match="segment_ids: expected contiguous runs .* received id 0 again at row 0, "
                                         "position 20"):
        sk.sparsek_attention(q, k, v, u, segment_ids=back, **OPTIONS)
    with pytest.raises(ValueError, match="segment_ids: expected contiguous runs"):
        sk.prefix_thresholds(u, segment_ids=back, **OPTIONS)
    # Under a trace a change of id starts a new document, on every path: the same as ids 0, 1, 2.
    runs = jnp.asarray([[0] * 10 + [1] * 10 + [2] * 10, [0] * 30], jnp.int32)
    for impl, extra in IMPLEMENTATIONS:
        run = attention(impl, extra, **OPTIONS)
        np.testing.assert_array_equal(np.asarray(run(q, k, v, u, back)), np.asarray(run(q, k, v, u, runs)),
                                      err_msg=impl)


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=np.ones((2, 5, 1, 0))), r"q: expected head_dim >= 1"),  # every head_dim checked on q first
    (dict(scale="a"), "scale: expected a positive finite number, received 'a'"),
    (dict(scale=-1.0), "scale: expected a positive finite number, received -1.0"),
    (dict(implementation="pallas_gpu"), r"implementation: 'pallas_gpu' needs a GPU .* pass interpret=True"),
    (dict(implementation="pallas_tpu"), r"implementation: 'pallas_tpu' needs a TPU .* pass interpret=True"),
])
def test_clear_errors(kwargs, match):
    args = dict(q=np.ones((2, 5, 2, 8), np.float32), k=np.ones((2, 5, 1, 8), np.float32),
                v=np.ones((2, 5, 1, 8), np.float32), scores=np.ones((2, 5, 1), np.float32), topk=2, window=2)
    if "k" in kwargs:
        args.update(q=np.ones((2, 5, 2, 0), np.float32), v=np.ones((2, 5, 1, 0), np.float32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sk.sparsek_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("scores"), **args)


def test_empty_sequence_is_empty():
    out = sk.sparsek_attention(jnp.zeros((1, 0, 2, 8)), jnp.zeros((1, 0, 1, 8)), jnp.zeros((1, 0, 1, 8)),
                               jnp.zeros((1, 0, 1)), topk=3, window=2)
    assert out.shape == (1, 0, 2, 8)


def test_operator_budget_and_nan_entries():
    z = jnp.asarray([[1.0, 2.0, 3.0], [0.5, 0.1, 0.2]])
    for bad in (-1.0, np.nan, 0.0):
        with pytest.raises(ValueError, match="k: expected positive finite budgets"):
            sk.sparsek(z, jnp.asarray([bad, 1.0]))
        # Traced, the bad row is NaN (it was zeros or ones), the other row exact.
        p = jax.jit(sk.sparsek)(z, jnp.asarray([bad, 1.0]))
        assert np.isnan(p[0]).all()
        np.testing.assert_allclose(p[1], sk.sparsek(z[1:], 1.0)[0])
    with pytest.raises(ValueError, match=r"z: expected no NaN entries \(mask entries out with mask=\)"):
        sk.sparsek(jnp.asarray([1.0, np.nan, 0.0]), 1)
    assert np.isnan(jax.jit(lambda z: sk.sparsek(z, 1))(jnp.asarray([1.0, np.nan, 0.0]))).all()
    assert np.isnan(jax.jit(lambda z: sk.sparsek_threshold(z, 1))(jnp.asarray([1.0, np.nan, 0.0])))
    with pytest.raises(ValueError, match=r"z: expected an array with at least one entry along its last axis, "
                                         r"received shape \(3, 0\)"):
        sk.sparsek(jnp.zeros((3, 0)), 1)


def small_model(**overrides):
    base = dict(vocab_size=40, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
                attention=("sparsek", "dense"), topk=2, window=2, implementation="xla",
                block_sizes=sk.BlockSizes(block_q=8), max_decode_length=12)
    base.update(overrides)
    return sknn.TransformerLM(sknn.ModelConfig(**base), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad_id", [40, 1000, -1])
def test_out_of_range_tokens_are_nan_at_their_position_only(rng, bad_id):
    model = small_model()
    tokens = jnp.asarray(rng.integers(0, 40, size=(2, 10)), jnp.int32)
    clean = nnx.jit(lambda m, t: m(t))(model, tokens)
    logits = nnx.jit(lambda m, t: m(t))(model, tokens.at[0, 6].set(bad_id))
    assert np.isnan(logits[0, 6]).all()
    nan_positions = np.argwhere(np.isnan(np.asarray(logits)).any(-1))
    assert nan_positions.tolist() == [[0, 6]], "no other position may be NaN (-1 must not wrap either)"
    np.testing.assert_allclose(logits[0, :6], clean[0, :6], atol=1e-5)  # earlier positions never see it
    np.testing.assert_allclose(logits[1], clean[1], atol=1e-5)
    with pytest.raises(ValueError, match=rf"prompt: expected token ids in \[0, 40\), received {bad_id}"):
        sknn.generate(model, tokens.at[1, 2].set(bad_id), 2)
    with pytest.raises(ValueError, match=r"tokens: expected an integer array \[batch, seq\], received shape \(10,\)"):
        model(tokens[0])


def test_dense_cache_overflow_is_loud(rng):
    # A dense layer with max_decode_length 12; the other layer is a sliding window (its cache has a fixed size,
    # as a SparseK layer's does, and compiles in a fraction of the time).
    model = small_model(attention=("sliding", "dense"))
    prompt = jnp.asarray(rng.integers(0, 40, size=(1, 8)), jnp.int32)
    with pytest.raises(ValueError, match=r"max_new_tokens: prompt \(8\) \+ new tokens \(5\) exceed the dense "
                                         r"layers' cache \(max_decode_length=12\)"):
        sknn.generate(model, prompt, 5)
    with pytest.raises(ValueError, match="prompt: expected at most max_decode_length=12 tokens"):
        model.prefill(jnp.zeros((1, 13), jnp.int32), model.init_cache(1))
    # Step by step past the cache (inside jit nothing can be raised): NaN logits, never a silently wrong number.
    cache = model.init_cache(1)
    logits, cache = nnx.jit(lambda m, t, c: m.prefill(t, c))(model, prompt, cache)
    step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    finite = []
    for position in range(8, 14):
        logits, cache = step(model, jnp.asarray([position % 40], jnp.int32), cache)
        finite.append(bool(np.isfinite(logits).all()))
    assert finite == [True] * 4 + [False] * 2


@pytest.mark.parametrize("overrides, match", [
    (dict(rope_base=0.0), "ModelConfig.rope_base: expected a finite number > 0"),
    (dict(norm_eps=-1.0), "ModelConfig.norm_eps: expected a finite number > 0"),
    (dict(head_dim=7), r"ModelConfig.head_dim: expected an even number \(RoPE rotates pairs\), received 7"),
    (dict(position_slope=float("nan")), "ModelConfig.position_slope: expected a finite number >= 0"),
    (dict(buffer_size=1), "ModelConfig.buffer_size: expected None or at least topk=2, received 1"),
    (dict(block_sizes=32), "ModelConfig.block_sizes: expected a BlockSizes or None, received 32"),
])
def test_model_config_ranges(overrides, match):
    with pytest.raises(ValueError, match=match):
        small_model(**overrides)


def test_prefix_thresholds_chunk_size(rng):
    u = random_scores(rng, 1, 40, 1, slope=0.05)
    a = sk.prefix_thresholds(u, topk=3, window=2, chunk_size=8)
    b = sk.prefix_thresholds(u, topk=3, window=2)
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="chunk_size: expected a positive int, received 0"):
        sk.prefix_thresholds(u, topk=3, window=2, chunk_size=0)
