"""Flax NNX modules: the scoring network, the attention layer, the transformer and decoding
(``sparsek_jax.nn.huggingface`` imports and exports Llama-family checkpoints).

``import sparsek_jax.nn as sknn`` or ``sk.nn`` after ``import sparsek_jax.nn``.
"""

from sparsek_jax.nn.attention import SparseKAttention
from sparsek_jax.nn.config import ATTENTION_KINDS, ModelConfig
from sparsek_jax.nn.generate import generate
from sparsek_jax.nn.rope import RopeScaling, apply_rope
from sparsek_jax.nn.scoring import ScoringNetwork
from sparsek_jax.nn.transformer import GatedMLP, RMSNorm, TransformerBlock, TransformerLM, cache_nbytes

__all__ = ["ATTENTION_KINDS", "GatedMLP", "ModelConfig", "RMSNorm", "RopeScaling", "ScoringNetwork", "SparseKAttention",
           "TransformerBlock", "TransformerLM", "apply_rope", "cache_nbytes", "generate"]
