"""Tile and kernel sizes of the blocked paths: one frozen dataclass with a default per implementation."""

from __future__ import annotations

import dataclasses

__all__ = ["BlockSizes"]

# Per implementation: (block_q, block_k, blocks_per_group, threshold_chunk, num_warps, num_stages, tile_rows,
# backward_block_k). The Pallas GPU and Triton values come from the tuning runs on the H200 in docs/kernels.md
# (Triton's rows and warps follow head_dim); TPU blocks are 128 lanes wide.
_DEFAULTS = {
    "xla": (64, None, None, 256, None, None, None, None),
    "pallas_gpu": (64, 32, 16, 256, 4, 2, None, None),
    "pallas_tpu": (64, 128, 16, 256, None, None, None, None),
    "triton": (64, 64, None, 256, None, 3, None, 32),
}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """How the blocked paths cut the work. ``None`` fields take the implementation's default
    (``BlockSizes.default(implementation)``); fields an implementation does not use are ignored.

    block_q: queries per tile; every query block shares one gathered tile of keys and one anchor list.
    block_k: keys per kernel step (Pallas GPU: a power of two; Pallas TPU: a multiple of 8, 128 on hardware;
      Triton: keys per step of the forward, a power of two >= 16).
    blocks_per_group: query blocks per super-block of the kernels' key-major backward pass.
    threshold_chunk: keys per lane of the thresholds' event simulation; a multiple of ``block_q``
      (shortened for short sequences).
    num_warps, num_stages: Triton launch parameters of the GPU attention kernels (Triton's ``num_warps``
      None: 4 up to head_dim 64, 8 above).
    tile_rows: Triton: query rows ((query, head) pairs of a KV group) per program, a power of two >= 16; also
      the keys per program of the key-major backward. None: 64 (one warpgroup's wgmma), fewer only where a
      32 KiB float32 accumulator (``8192 // head_dim`` rows, head_dim rounded up to a power of two) is smaller.
    backward_block_k: Triton: the backward's step, a power of two >= 16 and at most ``tile_rows`` (lowered to
      it where ``tile_rows`` follows head_dim): keys per step of the query-major kernel, rows per step of the
      key-major one.
    """

    block_q: int | None = None
    block_k: int | None = None
    blocks_per_group: int | None = None
    threshold_chunk: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    tile_rows: int | None = None
    backward_block_k: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"BlockSizes.{field.name}: expected a positive int or None, received {value!r}")
        if self.block_q and self.threshold_chunk and self.threshold_chunk % self.block_q:
            raise ValueError(f"BlockSizes.threshold_chunk: expected a multiple of block_q={self.block_q}, "
                             f"received {self.threshold_chunk}")

    @classmethod
    def default(cls, implementation: str) -> "BlockSizes":
        """The defaults of ``"xla"``, ``"pallas_gpu"``, ``"pallas_tpu"`` or ``"triton"``."""
        if implementation not in _DEFAULTS:
            raise ValueError(f"implementation: expected one of {', '.join(map(repr, _DEFAULTS))}, "
                             f"received {implementation!r}")
        return cls(*_DEFAULTS[implementation])

    def resolve(self, implementation: str, seq: int) -> "BlockSizes":
        """Every field set: this object's values, the implementation's defaults for the rest. A default
        ``threshold_chunk`` is rounded up to whole query blocks and no longer than ``seq`` needs."""
        defaults = BlockSizes.default(implementation)
        values = {f.name: getattr(defaults, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
                  for f in dataclasses.fields(self)}
        if self.threshold_chunk is None:
            block = values["block_q"]
            values["threshold_chunk"] = max(1, min(-(-values["threshold_chunk"] // block), -(-seq // block))) * block
        resolved = BlockSizes(**values)
        if implementation == "pallas_gpu" and resolved.block_k & (resolved.block_k - 1):
            raise ValueError(f"BlockSizes.block_k: expected a power of two for pallas_gpu, received {resolved.block_k}")
        if implementation == "triton":
            for name in ("block_k", "tile_rows", "backward_block_k"):
                value = getattr(resolved, name)
                if value is not None and (value < 16 or value & (value - 1)):
                    raise ValueError(f"BlockSizes.{name}: expected a power of two >= 16 for triton, received {value}")
            if resolved.tile_rows is not None and resolved.backward_block_k > resolved.tile_rows:
                raise ValueError(f"BlockSizes.backward_block_k: expected at most tile_rows={resolved.tile_rows} for "
                                 f"triton, received {resolved.backward_block_k}")
        return resolved
