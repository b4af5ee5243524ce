
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsek_jax as sk
from builders import assert_matches_reference, attention_inputs, value_and_grads
from sparsek_jax import validation


CASES = [  # (seq, q_heads, kv_heads, topk, window, gate, block, ties, segmented)
    (37, 4, 2, 3, 4, "value", 8, False, False),
    (40, 2, 1, 5, 0, "value", 16, True, True),
    (41, 2, 2, 4, 7, "logit", 8, False, True),
    (33, 4, 1, 6, 0, "logit", 8, True, False),
    (35, 2, 1, 3, 5, "none", 8, True, True),
    (29, 2, 2, 0, 5, "value", 8, False, True),      # topk = 0
    (27, 4, 2, 40, 3, "value", 8, False, False),    # topk >= seq
    (30, 2, 1, 30, 0, "value", 16, False, False),   # topk = seq, window = 0: dense causal
    (26, 2, 1, 2, 40, "value", 8, False, False),    # window > seq
    (50, 8, 2, 7, 3, "value", 16, True, True),      # GQA 4x, seq not a multiple of the block
]


@pytest.mark.parametrize("seq, q_heads, kv_heads, topk, window, gate, block, ties, segmented", CASES)
def test_matches_reference_forward_and_gradients(rng, seq, q_heads, kv_heads, topk, window, gate, block, ties,
                                                 segmented):
    q, k, v, u, seg = attention_inputs(rng, 2, seq, q_heads, kv_heads, 8, ties=ties, segmented=segmented)
    cotangent = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))

    def run(implementation):
        return value_and_grads(lambda q, k, v, u: sk.sparsek_attention(
            q, k, v, u, topk=topk, window=window, gate=gate, segment_ids=seg, implementation=implementation,
            block_sizes=sk.BlockSizes(block_q=block)), q, k, v, u, cotangent)

    got = run("xla")
    assert_matches_reference(got, run("reference"))
    if gate != "none" and 0 < topk < seq - window:  # some query has more candidates than topk
        assert np.abs(np.asarray(got[1][3])).max() > 0


def test_bf16_inputs(rng):
    q, k, v, u, _ = attention_inputs(rng, 1, 48, 4, 2, 16)
    bf = lambda x: x.astype(jnp.bfloat16)
    out = sk.sparsek_attention(bf(q), bf(k), bf(v), u, topk=4, window=4, implementation="xla",
                               block_sizes=sk.BlockSizes(block_q=16))
    ref = sk.sparsek_attention(bf(q), bf(k), bf(v), u, topk=4, window=4, implementation="reference")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), atol=2e-2)


def test_no_quadratic_intermediate():
    """Every array in the forward+backward program is far smaller than seq^2 (the reference's masks)."""
    seq, topk, window, block = 2048, 16, 16, 32
    shapes = dict(q=(1, seq, 2, 16), k=(1, seq, 1, 16), v=(1, seq, 1, 16), u=(1, seq, 1))
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes.values()]

    def loss(q, k, v, u):
        return sk.sparsek_attention(q, k, v, u, topk=topk, window=window, implementation="xla",
                                    block_sizes=sk.BlockSizes(block_q=block)).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
    sizes = []

    def walk(jx):
        for eqn in jx.eqns:
            sizes.extend(int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape"))
            for param in eqn.params.values():
                for sub in (param if isinstance(param, (list, tuple)) else [param]):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    per_query = topk + window + block + 2 * 128 + 2 * block  # tile slots and threshold rows, generously
    assert max(sizes) <= seq * 2 * per_query, f"largest intermediate {max(sizes)} vs seq^2 = {seq * seq}"
    assert max(sizes) < seq * seq / 2


def test_auto_is_the_default_and_picks_the_backends_kernels(rng, monkeypatch):
    q, k, v, u, _ = attention_inputs(rng, 1, 20, 2, 1, 8)
    default = sk.sparsek_attention(q, k, v, u, topk=3, window=2)
    np.testing.assert_array_equal(default, sk.sparsek_attention(q, k, v, u, topk=3, window=2, implementation="xla"))
    for has_jax_triton in (True, False):
        monkeypatch.setattr(validation, "_has_jax_triton", lambda: has_jax_triton)
        gpu = "triton" if has_jax_triton else "pallas_gpu"
        for platform, expected in (("gpu", gpu), ("tpu", "pallas_tpu"), ("cpu", "xla")):
            monkeypatch.setattr(validation.jax, "default_backend", lambda: platform)
            assert validation.resolve_implementation("auto") == expected
            # The thresholds have GPU kernels in Pallas only, and none for TPUs (their "auto" there is XLA).
            assert validation.resolve_implementation("auto", ("auto", "xla", "pallas_gpu")) == {
                "gpu": "pallas_gpu", "tpu": "xla", "cpu": "xla"}[platform]


def test_vmap_and_block_options(rng):
    q, k, v, u, _ = attention_inputs(rng, 3, 24, 2, 1, 8)
    f = lambda q, k, v, u: sk.sparsek_attention(q[None], k[None], v[None], u[None], topk=3, window=2,
                                                implementation="xla", block_sizes=sk.BlockSizes(block_q=8))[0]
    np.testing.assert_allclose(jax.vmap(f)(q, k, v, u),
                               sk.sparsek_attention(q, k, v, u, topk=3, window=2, implementation="xla"),
                               atol=1e-6)
    with pytest.raises(ValueError, match="BlockSizes.block_q: expected a positive int or None, received 0"):
        sk.sparsek_attention(q, k, v, u, topk=3, window=2, block_sizes=sk.BlockSizes(block_q=0))
    with pytest.raises(ValueError, match="BlockSizes.threshold_chunk: expected a multiple of block_q=8, received 12"):
        sk.BlockSizes(block_q=8, threshold_chunk=12)
    with pytest.raises(ValueError, match="BlockSizes.block_k: expected a power of two for pallas_gpu, received 24"):
        sk.sparsek_attention(q, k, v, u, topk=3, window=2, implementation="pallas_gpu", interpret=True,
                             block_sizes=sk.BlockSizes(block_k=24))
    with pytest.raises(ValueError, match="block_sizes: expected a BlockSizes or None, received 8"):
        sk.sparsek_attention(q, k, v, u, topk=3, window=2, block_sizes=8)
    with pytest.raises(ValueError, match=r"buffer_size: expected None or at least min\(topk, seq\)=3, received 2"):
        sk.sparsek_attention(q, k, v, u, topk=3, window=2, implementation="xla", buffer_size=2)


def test_program_does_not_grow_with_the_sequence():
    # The forward+backward program depends on the length only through shapes: no unrolled loops, no
    # per-length constants (each new length once compiled a larger program, and 512 tokens took minutes).
    import re

    def instructions(seq):
        shapes = [(1, seq, 2, 64)] * 3 + [(1, seq, 2)]
        loss = lambda q, k, v, u: jnp.sum(sk.sparsek_attention(q, k, v, u, topk=64, window=64, implementation="xla"))
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(
            *(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))
        return len(re.findall(r"= \S+ [\w-]+\(", lowered.as_text(dialect="hlo")))

    short, long = instructions(1024), instructions(8192)
    assert abs(long - short) <= 8, f"HLO instructions: {short} at 1024 tokens, {long} at 8192"
