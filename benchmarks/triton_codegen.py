"""What the Triton attention kernels compile to for the H200 (sm_90a), on any machine: no GPU needed.

    python -m benchmarks.triton_codegen               # the 64k benchmark's shapes, 12:12 and 12:4

Each kernel is compiled with ``triton.compile`` for a CUDA 9.0 target at the shapes of a problem (the
constexprs the launchers pass; pointers 16-byte aligned, as jax-triton declares them). The cubin is
disassembled with the ``nvdisasm`` that ships with Triton and the PTX assembled again with its ``ptxas -v``:
per kernel, the number of wgmma instructions (``HGMMA``), registers, spilled bytes, local-memory accesses
(``LDL``/``STL``), atomics (``REDG``/``ATOMG``) and shared memory. Writes
benchmarks/results/triton_codegen.json.
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
    """Instruction counts of the SASS and ``ptxas -v``'s resources of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        sass = subprocess.run([os.path.join(_BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
        report = subprocess.run([os.path.join(_BIN, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o",
                                 os.path.join(tmp, "again.cubin")], capture_output=True, text=True, check=True).stderr
    ops = collections.Counter(re.findall(r"\b(HGMMA|HMMA|LDL|STL|REDG|ATOMG|MUFU\.EX2)\b", sass))
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    registers = re.search(r"Used (\d+) registers", report)
    return {"hgmma": ops["HGMMA"], "hmma": ops["HMMA"], "local_memory_instructions": ops["LDL"] + ops["STL"],
            "spill_bytes": sum(spills), "registers": int(registers.group(1)) if registers else None,
            "atomics": ops["REDG"] + ops["ATOMG"], "exp2": ops["MUFU.EX2"],
            "shared_bytes": compiled.metadata.shared, "ptx_target": "sm_90a" if ".target sm_90a" in
            compiled.asm["ptx"] else None}


def main(argv=None):
    from benchmarks import reporting

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--launch", default="128,64,32,8,3",
                        help="rows,block_k,backward_block_k,num_warps,num_stages")
    args = parser.parse_args(argv)
    launch = kernels.Launch(*(int(x) for x in args.launch.split(",")))
    rows = []
    for kv_heads in (12, 4):
        for gate in ("value", "logit", "none"):
            for name in _KERNELS:
                constants = constexprs(name, seq=args.seq, q_heads=12, kv_heads=kv_heads, head_dim=args.head_dim,
                                       topk=1024, window=1024, gate=gate, launch=launch)
                row = {"kernel": name, "heads": f"12:{kv_heads}", "gate": gate, "launch": args.launch,
                       **inspect(compile_kernel(name, constants, launch))}
                print(row, flush=True)
                rows.append(row)
    reporting.write_json("triton_codegen", vars(args), rows)


if __name__ == "__main__":
    main()
