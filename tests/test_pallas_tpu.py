"""The Pallas TPU (Mosaic) kernels in TPU interpret mode on CPU, forward and all gradients, against the reference.

TPU interpret mode simulates the TPU's memory spaces and is slow: the shapes are tiny and few.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import sparsek_jax as sk
from builders import assert_matches_reference, attention_inputs, value_and_grads

CASES = [  # (seq, q_heads, kv_heads, topk, window, gate, ties, segmented, blocks_per_group)
    (29, 4, 2, 3, 5, "value", False, True, 2),    # GQA 2:1, window > 0, documents, a partial super-block
    (24, 2, 1, 4, 0, "logit", True, True, 1),     # window 0 (pure SparseK), ties
    (21, 3, 1, 2, 3, "none", False, False, 3),    # 3 query heads per KV head (tile rows padded to 8s)
    (19, 2, 2, 40, 2, "value", False, False, 1),  # topk larger than every prefix
]


@pytest.mark.parametrize("seq, q_heads, kv_heads, topk, window, gate, ties, segmented, blocks_per_group", CASES)
def test_tpu_interpret_mode_matches_reference(rng, seq, q_heads, kv_heads, topk, window, gate, ties, segmented,
                                              blocks_per_group):
    q, k, v, u, seg = attention_inputs(rng, 1, seq, q_heads, kv_heads, 8, ties=ties, segmented=segmented)
    cotangent = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    options = dict(topk=topk, window=window, gate=gate, segment_ids=seg)
    blocks = sk.BlockSizes(block_q=8, block_k=8, blocks_per_group=blocks_per_group)

    def run(implementation, **extra):
        return value_and_grads(lambda q, k, v, u: sk.sparsek_attention(
            q, k, v, u, implementation=implementation, **options, **extra), q, k, v, u, cotangent)

    # Through the public entry point (sparsek_attention), forward and every gradient.
    assert_matches_reference(run("pallas_tpu", interpret=True, block_sizes=blocks), run("reference"))

