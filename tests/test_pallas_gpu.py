"""The fused Pallas GPU forward: in interpret mode on CPU against the reference; at real sizes on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsek_jax as sk
from test_xla_attention import inputs

CASES = [  # (seq, q_heads, kv_heads, topk, window, gate, block, ties, segmented)
    (37, 4, 2, 3, 4, "value", 8, False, False),
    (40, 2, 1, 5, 0, "logit", 16, True, True),
    (35, 2, 1, 3, 5, "none", 8, True, True),
    (29, 2, 2, 0, 5, "value", 8, False, True),      # topk = 0
    (27, 4, 2, 40, 3, "value", 8, False, False),    # topk >= seq
    (30, 6, 2, 4, 3, "value", 8, False, True),      # 3 query heads per KV head: tile rows padded to 32
]


@pytest.mark.parametrize("seq, q_heads, kv_heads, topk, window, gate, block, ties, segmented", CASES)
def test_interpret_mode_matches_reference(rng, seq, q_heads, kv_heads, topk, window, gate, block, ties, segmented):
    q, k, v, u, seg = inputs(rng, 2, seq, q_heads, kv_heads, 8, ties=ties, segmented=segmented)
    cotangent = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))

    def run(implementation, **extra):
        def f(q, k, v, u):
            out = sk.sparsek_attention(q, k, v, u, topk=topk, window=window, gate=gate, segment_ids=seg,
                                       implementation=implementation, block_size=block, **extra)
            return jnp.sum(out * cotangent), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, u)

    (_, ref), ref_grads = run("reference")
    (_, out), grads = run("pallas_gpu", interpret=True)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    for name, g, r in zip(("dq", "dk", "dv", "dscores"), grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-4, err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("seq, q_heads, kv_heads, head_dim, topk, window",
                         [(4096, 12, 12, 64, 1024, 1024), (8192, 12, 4, 128, 256, 256), (3001, 8, 2, 64, 512, 128)])
def test_gpu_matches_xla_path_in_bf16(rng, seq, q_heads, kv_heads, head_dim, topk, window):
    q, k, v, u, _ = inputs(rng, 1, seq, q_heads, kv_heads, head_dim)
    u = u + 1e-3 * jnp.arange(seq, dtype=jnp.float32)[None, :, None]
    bf = lambda x: x.astype(jnp.bfloat16)
    run = lambda impl: sk.sparsek_attention(bf(q), bf(k), bf(v), u, topk=topk, window=window, implementation=impl)
    np.testing.assert_allclose(run("pallas_gpu").astype(np.float32), run("xla").astype(np.float32), atol=3e-2)
