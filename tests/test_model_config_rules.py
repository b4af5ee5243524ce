"""ModelConfig refuses attention that would leave a query with no key to attend to."""

import pytest

from sparsek_jax.nn.config import ModelConfig

SIZES = dict(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)


def test_a_layer_whose_queries_would_see_no_key_is_refused():
    with pytest.raises(ValueError, match=r"ModelConfig.topk: expected >= 1 for sparsek layers with window 0 \(a "
                                         r"query would see no key\), received 0"):
        ModelConfig(**SIZES, attention=("dense", "sparsek"), window=0, topk=0)
    with pytest.raises(ValueError, match=r"ModelConfig.topk: expected >= topk_block_size=16 for block_topk layers "
                                         r"with window 0 .* received 8"):
        ModelConfig(**SIZES, attention="block_topk", window=0, topk=8)
    # Keys from either side are enough; other kinds ignore topk.
    ModelConfig(**SIZES, attention="sparsek", window=0, topk=1)
    ModelConfig(**SIZES, attention="sparsek", window=1, topk=0)
    ModelConfig(**SIZES, attention="block_topk", window=0, topk=16)
    ModelConfig(**SIZES, attention="block_topk", window=4, topk=0)
    ModelConfig(**SIZES, attention="dense", window=0, topk=0)
