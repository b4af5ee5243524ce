
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsek_jax as sk
from sparsek_jax import attention as attention_module


def inputs(rng, batch, seq, q_heads, kv_heads, dim, *, ties=False, segmented=False):
    q = rng.normal(size=(batch, seq, q_heads, dim))
    k = rng.normal(size=(batch, seq, kv_heads, dim))
    v = rng.normal(size=(batch, seq, kv_heads, dim))
    u = rng.normal(size=(batch, seq, kv_heads)) * 1.5
    if ties:
        u = np.round(u * 2) / 2
    seg = None
    if segmented:
        cuts = [np.sort(rng.choice(np.arange(3, seq - 2), size=2, replace=False)) for _ in range(batch)]
        seg = jnp.asarray(np.stack([np.searchsorted(c, np.arange(seq), side="right") for c in cuts]), jnp.int32)
    arrays = tuple(jnp.asarray(x.astype(np.float32)) for x in (q, k, v, u))
    return arrays + (seg,)


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
    q, k, v, u, seg = inputs(rng, 2, seq, q_heads, kv_heads, 8, ties=ties, segmented=segmented)
    cotangent = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))

    def loss(impl):
        def f(q, k, v, u):
            out = sk.sparsek_attention(q, k, v, u, topk=topk, window=window, gate=gate, segment_ids=seg,
                                       implementation=impl, block_size=block)
            return jnp.sum(out * cotangent), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))

    (_, ref_out), ref_grads = loss("reference")(q, k, v, u)
    (_, out), grads = loss("xla")(q, k, v, u)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    for name, g, ref in zip(("dq", "dk", "dv", "dscores"), grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=5e-5, rtol=1e-4, err_msg=name)
    if gate != "none" and 0 < topk < seq - window:  # some query has more candidates than topk
        assert np.abs(np.asarray(grads[3])).max() > 0


def test_bf16_inputs(rng):
    q, k, v, u, _ = inputs(rng, 1, 48, 4, 2, 16)
    bf = lambda x: x.astype(jnp.bfloat16)
    out = sk.sparsek_attention(bf(q), bf(k), bf(v), u, topk=4, window=4, implementation="xla", block_size=16)
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
                                    block_size=block).sum()

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


def test_auto_picks_the_backends_kernels(rng, monkeypatch):
    q, k, v, u, _ = inputs(rng, 1, 20, 2, 1, 8)
    auto = sk.sparsek_attention(q, k, v, u, topk=3, window=2, implementation="auto")
    np.testing.assert_allclose(auto, sk.sparsek_attention(q, k, v, u, topk=3, window=2, implementation="xla"))
    for platform, expected in (("gpu", "pallas_gpu"), ("tpu", "pallas_tpu"), ("cpu", "xla")):
        monkeypatch.setattr(attention_module.jax, "default_backend", lambda: platform)
        assert attention_module._resolve_implementation("auto") == expected


def test_vmap_and_block_options(rng):
    q, k, v, u, _ = inputs(rng, 3, 24, 2, 1, 8)
    f = lambda q, k, v, u: sk.sparsek_attention(q[None], k[None], v[None], u[None], topk=3, window=2,
                                                implementation="xla", block_size=8)[0]
    np.testing.assert_allclose(jax.vmap(f)(q, k, v, u),
                               sk.sparsek_attention(q, k, v, u, topk=3, window=2, implementation="xla"),
                               atol=1e-6)
    with pytest.raises(ValueError, match="block_size: expected a positive int, received 0"):
        sk.sparsek_attention(q, k, v, u, topk=3, window=2, implementation="xla", block_size=0)
    with pytest.raises(ValueError, match=r"buffer_size: expected at least min\(topk, seq\)=3, received 2"):
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
