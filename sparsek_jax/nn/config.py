"""The model's configuration: one frozen dataclass, validated on creation."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from sparsek_jax import validation
from sparsek_jax.block_sizes import BlockSizes
from sparsek_jax.thresholds import resolve_buffer_size
from sparsek_jax.nn.rope import RopeScaling

ATTENTION_KINDS = ("dense", "sliding", "sparsek", "block_topk")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only language model with dense, sliding-window or SparseK attention per layer.

    ``attention`` is one kind for every layer or a tuple with one kind per layer, so the baselines are the
    same code: ``dense``, ``sliding``, ``sparsek``, or ``block_topk`` (a prior sparse attention with the same
    key budget: each query picks the ``topk // topk_block_size`` blocks of ``topk_block_size`` keys whose
    mean key matches it best, ``sparsek_jax.block_topk``; no decoding cache). ``window`` is the sliding window
    of ``sliding``, ``sparsek`` and ``block_topk`` layers; ``topk`` the keys the last two select beyond it. ``position_slope`` is the ε of the scoring network
    (``u_j = x_j · w_score + ε j``) and ``scorer_init_std`` the standard deviation of ``w_score`` at
    initialisation (0: zeros).

    ``scale_embeddings`` multiplies the input embeddings by ``sqrt(d_model)`` (and divides the tied output
    projection by it); imported Llama-family checkpoints turn it off, as do ``qkv_bias`` (Qwen2) and
    ``out_bias`` add the projections' biases of checkpoints that have them.
    """

    vocab_size: int
    d_model: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 2048
    attention: str | tuple[str, ...] = "sparsek"
    topk: int = 64
    window: int = 64
    topk_block_size: int = 16             # keys per block of block_topk layers
    position_slope: float = 1e-3
    scorer_init_std: float = 0.0
    gate: str = "value"
    implementation: str = "auto"          # sparsek_attention implementation
    dense_implementation: str | None = None  # dense/sliding layers: "xla", "cudnn"; None: cuDNN on GPUs in 16 bits
    block_sizes: BlockSizes | None = None  # sparsek_attention's tiles and kernel parameters (None: defaults)
    interpret: bool = False        # Pallas kernels in interpret mode (tests and debugging on CPU)
    buffer_size: int | None = None
    rope_base: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    scale_embeddings: bool = True
    qkv_bias: bool = False         # biases of the q, k and v projections
    out_bias: bool = False         # bias of the output projection
    dtype: str = "float32"         # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"            # "none" or a jax.checkpoint_policies name, e.g. "nothing_saveable"
    scan_layers: bool = False
    max_decode_length: int = 4096  # dense layers' preallocated cache

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                     "max_decode_length", "topk_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name}: expected a positive int, received {value!r}")
        for name in ("topk", "window"):
            validation.check_nonnegative_int(f"ModelConfig.{name}", getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads: expected a multiple of num_kv_heads={self.num_kv_heads}, "
                             f"received {self.num_heads}")
        kinds = self.layer_kinds
        if len(kinds) != self.num_layers:
            raise ValueError(f"ModelConfig.attention: expected one kind or {self.num_layers} kinds (num_layers), "
                             f"received {len(kinds)}")
        for kind in kinds:
            validation.check_choice("ModelConfig.attention", kind, ATTENTION_KINDS)
        if "sliding" in kinds and self.window < 1:
            raise ValueError("ModelConfig.window: expected >= 1 for sliding layers, received 0")
        # With no window a query attends only to the keys it selects: none would leave it nothing to attend to.
        if "sparsek" in kinds and self.window == 0 and self.topk == 0:
            raise ValueError("ModelConfig.topk: expected >= 1 for sparsek layers with window 0 (a query would see "
                             "no key), received 0")
        if "block_topk" in kinds and self.window == 0 and self.topk < self.topk_block_size:
            raise ValueError(f"ModelConfig.topk: expected >= topk_block_size={self.topk_block_size} for block_topk "
                             f"layers with window 0 (they select topk // topk_block_size blocks: a query would see "
                             f"no key), received {self.topk}")
        validation.check_choice("ModelConfig.gate", self.gate, validation.GATES)
        validation.check_choice("ModelConfig.implementation", self.implementation, validation.IMPLEMENTATIONS)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"ModelConfig.rope_scaling: expected a RopeScaling or None, received "
                             f"{self.rope_scaling!r}")
        if self.block_sizes is not None and not isinstance(self.block_sizes, BlockSizes):
            raise ValueError(f"ModelConfig.block_sizes: expected a BlockSizes or None, received {self.block_sizes!r}")
        validation.check_choice("ModelConfig.dense_implementation", self.dense_implementation,
                                (None, "xla", "cudnn"))
        for name in ("dtype", "param_dtype"):
            validation.check_choice(f"ModelConfig.{name}", getattr(self, name), ("float32", "bfloat16", "float16"))
        if self.remat != "none" and not hasattr(jax.checkpoint_policies, self.remat):
            policies = sorted(p for p in dir(jax.checkpoint_policies) if not p.startswith("_"))
            raise ValueError(f"ModelConfig.remat: expected 'none' or one of {policies}, received {self.remat!r}")
        if self.scan_layers and len(set(kinds)) > 1:
            raise ValueError(f"ModelConfig.scan_layers: expected one attention kind for all layers when scanning, "
                             f"received {kinds}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim: expected an even number (RoPE rotates pairs), received "
                             f"{self.head_dim}")
        for name, low, inclusive in (("position_slope", 0.0, True), ("scorer_init_std", 0.0, True),
                                     ("rope_base", 0.0, False),
                                     ("norm_eps", 0.0, False)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
                value >= low if inclusive else value > low)
            if not ok:
                raise ValueError(f"ModelConfig.{name}: expected a finite number {'>=' if inclusive else '>'} {low:g}, "
                                 f"received {value!r}")
        # Sequences of any length: the buffer must hold topk scores.
        resolve_buffer_size(self.buffer_size, topk=self.topk, seq=None, name="ModelConfig.buffer_size")

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        if isinstance(self.attention, str):
            return (self.attention,) * self.num_layers
        return tuple(self.attention)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

