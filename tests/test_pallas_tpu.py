"""The Pallas TPU (Mosaic) kernels in TPU interpret mode on CPU, forward and all gradients, against the reference.

TPU interpret mode simulates the TPU's memory spaces and is slow: the shapes are tiny and few.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsek_jax as sk
from sparsek_jax.xla_attention import xla_sparsek_attention
from test_xla_attention import inputs

CASES = [  # (seq, q_heads, kv_heads, topk, window, gate, ties, segmented, blocks_per_group)
    (29, 4, 2, 3, 5, "value", False, True, 2),    # GQA 2:1, window > 0, documents, a partial super-block
    (24, 2, 1, 4, 0, "logit", True, True, 1),     # window 0 (pure SparseK), ties
    (21, 3, 1, 2, 3, "none", False, False, 3),    # 3 query heads per KV head (tile rows padded to 8s)
    (19, 2, 2, 40, 2, "value", False, False, 1),  # topk larger than every prefix
]


@pytest.mark.parametrize("seq, q_heads, kv_heads, topk, window, gate, ties, segmented, blocks_per_group", CASES)
def test_tpu_interpret_mode_matches_reference(rng, seq, q_heads, kv_heads, topk, window, gate, ties, segmented,
                                              blocks_per_group):
    q, k, v, u, seg = inputs(rng, 1, seq, q_heads, kv_heads, 8, ties=ties, segmented=segmented)
    cotangent = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    scale = 1.0 / np.sqrt(8)

    def value_and_grads(attention):
        f = lambda q, k, v, u: attention(q, k, v, u)
        out, vjp = jax.vjp(f, q, k, v, u)
        return out, vjp(cotangent)

    ref, ref_grads = value_and_grads(lambda q, k, v, u: sk.sparsek_attention(
        q, k, v, u, topk=topk, window=window, gate=gate, segment_ids=seg, implementation="reference"))
    out, grads = value_and_grads(lambda q, k, v, u: xla_sparsek_attention(
        q, k, v, u, seg, topk=topk, window=window, gate=gate, scale=scale, block_size=8, path="pallas_tpu",
        interpret=True, block_k=8, blocks_per_group=blocks_per_group))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    for name, g, r in zip(("dq", "dk", "dv", "dscores"), grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-4, err_msg=name)


def test_public_entry_point_runs_the_tpu_kernels(rng):
    q, k, v, u, _ = inputs(rng, 1, 16, 2, 1, 8)
    out = sk.sparsek_attention(q, k, v, u, topk=3, window=2, implementation="pallas_tpu", interpret=True,
                               block_size=8)
    ref = sk.sparsek_attention(q, k, v, u, topk=3, window=2, implementation="reference")
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
