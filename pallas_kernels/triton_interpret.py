"""Triton kernels run by Triton's interpreter on the host, called from JAX (``jax.pure_callback``), so that
``@triton.jit`` kernels can be checked numerically on a machine without a GPU, inside ``jax.jit`` and
``jax.grad``.

The interpreter replaces every ``@triton.jit`` function at decoration time when ``TRITON_INTERPRET=1`` is set
before ``triton`` is first imported; a process that imported triton without it cannot interpret, so the
interpreter runs in a process of its own (the tests start one). It expects torch-like tensors: ``HostArray``
gives a numpy array the few methods it calls (a pointer, strides, a storage that is already on the host).
"""

from __future__ import annotations

import os
import threading
from typing import Sequence

import jax
import ml_dtypes
import numpy as np

__all__ = ["is_interpreting", "call"]

# The interpreter patches triton.language while it runs a kernel; callbacks of several devices (shard_map over a
# mesh) run on threads of their own, so one kernel runs at a time.
_ONE_AT_A_TIME = threading.Lock()


def is_interpreting() -> bool:
    """Whether this process's Triton interprets its kernels (``TRITON_INTERPRET=1`` at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class HostArray:
    """A contiguous numpy array seen by the interpreter as a tensor on the host."""

    def __init__(self, array: np.ndarray):
        import triton.language as tl

        types = {np.dtype(np.float32): tl.float32, np.dtype(np.float16): tl.float16,
                 np.dtype(ml_dtypes.bfloat16): tl.bfloat16, np.dtype(np.int32): tl.int32}
        self.array = np.ascontiguousarray(array)
        self.dtype = types[self.array.dtype]

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def stride(self):
        return tuple(s // self.array.itemsize for s in self.array.strides)

    def size(self):
        return self.array.shape

    def storage_offset(self) -> int:
        return 0

    # The interpreter copies each argument's storage to the host and back; this one lives there already.
    def untyped_storage(self):
        return self

    def cpu(self):
        return self

    def new_empty(self, *args, **kwargs):
        return self

    def set_(self, *args):
        return self

    def copy_(self, other):
        return self


def call(kernel, grid: tuple[int, ...], inputs: Sequence[jax.Array], out_shapes: Sequence[jax.ShapeDtypeStruct],
         input_output_aliases: dict[int, int] | None = None, **constexprs):
    """Runs ``kernel[grid](*inputs, *outputs, **constexprs)`` in the interpreter; returns the outputs.

    Outputs start as zeros, or as a copy of the input an entry of ``input_output_aliases`` (input index ->
    output index) names: what ``jax_triton.triton_call`` gives with ``zeroed_outputs`` and aliasing.
    """
    if not is_interpreting():
        raise RuntimeError("interpret=True with implementation='triton' needs TRITON_INTERPRET=1 in the "
                           "environment before triton is first imported (run it in a process of its own)")
    aliases = {out: inp for inp, out in (input_output_aliases or {}).items()}

    def run(*arrays):
        arrays = [np.asarray(a) for a in arrays]
        outputs = [np.array(arrays[aliases[n]], dtype=s.dtype) if n in aliases else np.zeros(s.shape, s.dtype)
                   for n, s in enumerate(out_shapes)]
        wrapped = [HostArray(a) for a in arrays + outputs]
        with _ONE_AT_A_TIME:
            kernel[grid](*wrapped, **constexprs)
        return tuple(w.array for w in wrapped[len(arrays):])

    return jax.pure_callback(run, tuple(out_shapes), *inputs, vmap_method="sequential")
