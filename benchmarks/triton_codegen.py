"""What the Triton attention kernels compile to for the H200 (sm_90a), on any machine: no GPU needed.

    python -m benchmarks.triton_codegen                   # the 64k benchmark's shapes, 12:12 and 12:4
    python -m benchmarks.triton_codegen --head-dim 128    # its head_dim 128 case (64-row tiles)

Each kernel is compiled with ``triton.compile`` for a CUDA 9.0 target at the shapes of a problem (the
constexprs the launchers pass; pointers 16-byte aligned, as jax-triton declares them). The cubin is
disassembled with the ``nvdisasm`` that ships with Triton and its resources read with ``cuobjdump``: per kernel,
the number of wgmma instructions (``HGMMA``), registers, stack frame and local memory (spilled registers would
live there), local-memory accesses (``LDL``/``STL``), atomics (``REDG``/``ATOMG``) and shared memory. Writes
benchmarks/results/triton_codegen_d<head_dim>.json.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget

import sparsek_jax as sk
from sparsek_kernels import triton_adapter
from sparsek_kernels import triton_attention as kernels

_BIN = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
_KERNELS = {"forward": kernels._forward_kernel, "backward_queries": kernels._backward_queries_kernel,
            "backward_keys": kernels._backward_keys_kernel}
_INT_POINTERS = ("seg_ptr", "anchors_ptr", "theta_pos_ptr")
_INPUT_POINTERS = ("q_ptr", "k_ptr", "v_ptr", "do_ptr")  # q's dtype; every other pointer is float32


def constexprs(name: str, *, seq: int, q_heads: int, kv_heads: int, head_dim: int, topk: int, window: int,
               gate: str, launch: kernels.Launch, anchor_block: int = 64, dtype=jnp.bfloat16) -> dict:
    """The constexprs the launcher of kernel ``name`` passes for one sequence of these sizes."""
    q = jax.ShapeDtypeStruct((1, seq, q_heads, head_dim), dtype)
    k = jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), dtype)
    sizes = kernels._sizes(q, k, window=window, anchor_block=anchor_block, scale=head_dim ** -0.5, gate=gate,
                           launch=launch)
    if name == "backward_keys":
        sizes.update(KEYS=launch.rows, STEP=launch.backward_block_k)
    else:
        sizes.update(NUM_BLOCKS=-(-seq // anchor_block), NUM_ANCHORS=min(topk, seq),
                     BLOCK_K=launch.block_k if name == "forward" else launch.backward_block_k)
    return sizes


def compile_kernel(name: str, constants: dict, launch: kernels.Launch, dtype: str = "bf16"):
    """``triton.compile`` of kernel ``name`` for sm_90a; returns the compiled kernel."""
    fn = _KERNELS[name]
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in constants:
            signature[arg] = "constexpr"
        else:
            signature[arg] = "*i32" if arg in _INT_POINTERS else f"*{dtype}" if arg in _INPUT_POINTERS else "*fp32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})


def inspect(compiled) -> dict:
    """Instruction counts of the SASS and the resources of a compiled kernel (``cuobjdump``): registers, stack
    frame and local memory (where spilled registers would go), shared memory."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(_BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
    ops = collections.Counter(re.findall(r"\b(HGMMA|HMMA|LDL|STL|REDG|ATOMG|MUFU\.EX2)\b", sass))
    resources = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
    return {"hgmma": ops["HGMMA"], "hmma": ops["HMMA"], "local_memory_instructions": ops["LDL"] + ops["STL"],
            "registers": resources["REG"], "stack_bytes": resources["STACK"], "local_bytes": resources["LOCAL"],
            "atomics": ops["REDG"] + ops["ATOMG"], "exp2": ops["MUFU.EX2"], "shared_bytes": compiled.metadata.shared,
            "ptx_target": "sm_90a" if ".target sm_90a" in compiled.asm["ptx"] else None}


def main(argv=None):
    from benchmarks import reporting

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--launch", default=None, help="rows,block_k,backward_block_k,num_warps,num_stages "
                                                          "(default: the defaults of sk.BlockSizes for triton)")
    args = parser.parse_args(argv)
    if args.launch:
        launch = kernels.Launch(*(int(x) for x in args.launch.split(",")))
    else:
        defaults = sk.BlockSizes.default("triton")
        launch = triton_adapter.launch(args.head_dim, rows=defaults.tile_rows, block_k=defaults.block_k,
                                       backward_block_k=defaults.backward_block_k, num_warps=defaults.num_warps,
                                       num_stages=defaults.num_stages)
    rows = []
    for kv_heads in (12, 4):
        for gate in ("value", "logit", "none"):
            for name in _KERNELS:
                constants = constexprs(name, seq=args.seq, q_heads=12, kv_heads=kv_heads, head_dim=args.head_dim,
                                       topk=1024, window=1024, gate=gate, launch=launch)
                row = {"kernel": name, "heads": f"12:{kv_heads}", "head_dim": args.head_dim, "gate": gate,
                       "launch": ",".join(map(str, launch)),
                       **inspect(compile_kernel(name, constants, launch))}
                print(row, flush=True)
                rows.append(row)
    reporting.publish(f"triton_codegen_d{args.head_dim}", vars(args), rows, columns=[
        ("kernel", "kernel", "s"), ("heads", "heads", "s"), ("gate", "gate", "s"), ("launch", "launch", "s"),
        ("hgmma", "HGMMA", "d"), ("hmma", "HMMA", "d"), ("registers", "registers", "d"),
        ("stack_bytes", "stack bytes", "d"), ("local_memory_instructions", "LDL/STL", "d"),
        ("atomics", "REDG", "d"), ("exp2", "MUFU.EX2", "d"), ("shared_bytes", "shared bytes", "d")])


if __name__ == "__main__":
    main()
