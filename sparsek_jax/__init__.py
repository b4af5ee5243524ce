"""SparseK-JAX: learned, differentiable top-k sparse attention for long-context language models.

The functional core (no Flax): the SPARSEK operator, prefix thresholds, the dense pattern and
``sparsek_attention``. ``import sparsek_jax as sk``.
"""

from sparsek_jax.attention import sparsek_attention
from sparsek_jax.block_topk import block_topk_attention
from sparsek_jax.block_sizes import BlockSizes
from sparsek_jax.blocked import MeshAxes
from sparsek_jax.operator import sparsek, sparsek_threshold
from sparsek_jax.pattern import AttentionPattern, attention_pattern
from sparsek_jax.thresholds import ThresholdInfo, default_buffer_size, is_selected, prefix_thresholds

__all__ = [
    "AttentionPattern",
    "BlockSizes",
    "MeshAxes",
    "ThresholdInfo",
    "attention_pattern",
    "block_topk_attention",
    "default_buffer_size",
    "is_selected",
    "prefix_thresholds",
    "sparsek",
    "sparsek_attention",
    "sparsek_threshold",
]

__version__ = "0.1.0"


def __getattr__(name):
    # sk.nn (Flax) and sk.data (TFDS, grain) load on first use: the functional core imports neither.
    if name in ("nn", "data"):
        import importlib

        return importlib.import_module(f"sparsek_jax.{name}")
    raise AttributeError(f"module 'sparsek_jax' has no attribute {name!r}")
