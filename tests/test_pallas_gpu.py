"""The Pallas GPU kernels (forward and backward): in interpret mode on CPU against the reference; at real sizes on
a GPU against the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsek_jax as sk
from builders import assert_matches_reference, attention_inputs, value_and_grads

CASES = [  # (seq, q_heads, kv_heads, topk, window, gate, block, ties, segmented)
    (37, 4, 2, 3, 4, "value", 8, False, False),
    (40, 2, 1, 5, 0, "logit", 16, True, True),
    (35, 2, 1, 3, 5, "none", 8, True, True),
    (29, 2, 2, 0, 5, "value", 8, False, True),      # topk = 0
    (27, 4, 2, 40, 3, "value", 8, False, False),    # topk >= seq
    (30, 6, 2, 4, 3, "value", 8, False, True),      # 3 query heads per KV head: tile rows padded to 32
]


def run(implementation, q, k, v, u, cotangent, **options):
    return value_and_grads(lambda q, k, v, u: sk.sparsek_attention(q, k, v, u, implementation=implementation,
                                                                   **options), q, k, v, u, cotangent)


@pytest.mark.parametrize("seq, q_heads, kv_heads, topk, window, gate, block, ties, segmented", CASES)
def test_interpret_mode_matches_reference(rng, seq, q_heads, kv_heads, topk, window, gate, block, ties, segmented):
    q, k, v, u, seg = attention_inputs(rng, 2, seq, q_heads, kv_heads, 8, ties=ties, segmented=segmented)
    cotangent = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    options = dict(topk=topk, window=window, gate=gate, segment_ids=seg)
    got = run("pallas_gpu", q, k, v, u, cotangent, interpret=True, block_sizes=sk.BlockSizes(block_q=block),
              **options)
    assert_matches_reference(got, run("reference", q, k, v, u, cotangent, **options))


@pytest.mark.parametrize("blocks_per_group", [1, 3])
def test_key_major_backward_any_super_block(rng, blocks_per_group):
    # The key-major backward kernel groups query blocks into super-blocks; every grouping gives the same
    # gradients (here with segments, ties, GQA and a sequence that is not a whole number of super-blocks).
    q, k, v, u, seg = attention_inputs(rng, 2, 53, 4, 2, 8, ties=True, segmented=True)
    cotangent = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    options = dict(topk=5, window=6, segment_ids=seg)
    got = run("pallas_gpu", q, k, v, u, cotangent, interpret=True,
              block_sizes=sk.BlockSizes(block_q=8, blocks_per_group=blocks_per_group), **options)
    assert_matches_reference(got, run("reference", q, k, v, u, cotangent, **options))


def relative_error(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.gpu
@pytest.mark.parametrize("seq, q_heads, kv_heads, head_dim, topk, window",
                         [(4096, 12, 12, 64, 1024, 1024), (8192, 12, 4, 128, 256, 256), (3001, 8, 2, 64, 512, 128)])
def test_gpu_matches_xla_path_in_bf16(rng, seq, q_heads, kv_heads, head_dim, topk, window):
    q, k, v, u, _ = attention_inputs(rng, 1, seq, q_heads, kv_heads, head_dim)
    u = u + 1e-3 * jnp.arange(seq, dtype=jnp.float32)[None, :, None]
    bf = lambda x: x.astype(jnp.bfloat16)
    q, k, v = bf(q), bf(k), bf(v)
    cotangent = bf(jnp.asarray(rng.normal(size=q.shape).astype(np.float32)))

    def run(impl):
        f = lambda q, k, v, u: sk.sparsek_attention(q, k, v, u, topk=topk, window=window, implementation=impl)
        out, vjp = jax.vjp(f, q, k, v, u)
        return (out,) + vjp(cotangent)

    got, expected = jax.jit(lambda: run("pallas_gpu"))(), jax.jit(lambda: run("xla"))()
    np.testing.assert_allclose(got[0].astype(np.float32), expected[0].astype(np.float32), atol=3e-2)
    for name, g, e in zip(("dq", "dk", "dv", "dscores"), got[1:], expected[1:]):
        assert relative_error(g, e) < 2e-2, (name, relative_error(g, e))
