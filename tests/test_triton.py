"""The Triton attention kernels (``implementation="triton"``) without a GPU: numerics in Triton's interpreter
against the XLA path (in processes of their own, ``tests/triton_interpreter_cases.py``), code generation for the
H200 (sm_90a: wgmma, no spills), the whole forward+backward lowered for CUDA under ``jax.jit``; with a GPU: bf16
at real sizes against the XLA path."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsek_jax as sk
from builders import attention_inputs, cpu_devices_env
from test_pallas_gpu import relative_error

HERE = Path(__file__).parent
ROOT = HERE.parent
# `make test` installs the jax CUDA plugin (needed to import jax_triton on a machine without a GPU) here, apart
# from the environment: in site-packages it would announce at every import of jax that it found no GPU.
CUDA_PLUGIN = Path(sys.prefix) / "jax-cuda-plugin"


def _interpreting():
    from sparsek_kernels import triton_interpret

    return triton_interpret.is_interpreting()


def _run(args, extra_env, timeout):
    env = {**os.environ, **extra_env}
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("cases", [("0", "1", "2", "3"), ("4", "5", "6"), ("end_to_end",)])
def test_interpreter_matches_xla_path(cases):
    # Output, dq, dk, dv and dscores against the XLA path on the Pallas GPU kernels' cases and one of the Triton
    # kernels' own; the end-to-end case runs the public function under jit and vjp, split over a 2 x 2 mesh of
    # CPU devices, against the dense reference.
    result = _run([str(HERE / "triton_interpreter_cases.py"), *cases],
                  cpu_devices_env(4, TRITON_INTERPRET="1"), 900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


# (kernel, gate, kv_heads of 12 query heads, head_dim): per kernel the benchmark's case, then the most registers
# at head_dim 64 (128-row tiles) and at head_dim 128 (64-row tiles; python -m benchmarks.triton_codegen lists all).
CODEGEN = [(kernel, "value", 12, 64) for kernel in ("forward", "backward_queries", "backward_keys")] + [
    ("forward", "logit", 4, 64), ("backward_queries", "logit", 12, 64), ("backward_keys", "value", 4, 64),
    ("forward", "logit", 4, 128), ("backward_queries", "value", 4, 128), ("backward_keys", "logit", 12, 128)]


@pytest.mark.parametrize("kernel, gate, kv_heads, head_dim", CODEGEN)
def test_kernels_compile_for_hopper(kernel, gate, kv_heads, head_dim):
    # At the 64k benchmark's sizes and the default launch: sm_90a code, every matrix product on wgmma, no
    # register spills, shared memory within the H200's 227 KiB per block.
    if _interpreting():
        pytest.skip("Triton interprets in this process: nothing compiles")
    from benchmarks import triton_codegen
    from sparsek_kernels import triton_adapter

    defaults = sk.BlockSizes.default("triton")
    launch = triton_adapter.launch(head_dim, rows=defaults.tile_rows, block_k=defaults.block_k,
                                   backward_block_k=defaults.backward_block_k, num_warps=defaults.num_warps,
                                   num_stages=defaults.num_stages)
    constants = triton_codegen.constexprs(kernel, seq=65536, q_heads=12, kv_heads=kv_heads, head_dim=head_dim,
                                          topk=1024, window=1024, gate=gate, launch=launch)
    report = triton_codegen.inspect(triton_codegen.compile_kernel(kernel, constants, launch))
    assert report["ptx_target"] == "sm_90a", report
    assert report["hgmma"] > 0 and report["hmma"] == 0, report
    assert report["stack_bytes"] == report["local_bytes"] == report["local_memory_instructions"] == 0, report
    assert report["shared_bytes"] <= 227 * 1024, report
    assert (report["atomics"] > 0) == (kernel == "backward_queries"), report


LOWER = textwrap.dedent("""
    import types
    import jax, jax.numpy as jnp
    from jax._src.pallas.triton import pallas_call_registration
    import jax_triton.triton_lib as triton_lib
    import sparsek_jax as sk
    from sparsek_jax import blocked

    # No GPU to ask: the Pallas thresholds and the Triton kernels are told they target sm_90.
    pallas_call_registration.gpu_info_lib = types.SimpleNamespace(
        get_gpu_info=lambda: types.SimpleNamespace(compute_capability="9.0"))
    compile_kernel = triton_lib.get_or_create_triton_kernel
    triton_lib.get_or_create_triton_kernel = lambda *a, compute_capability=None, **kw: compile_kernel(
        *a, compute_capability=compute_capability or 90, **kw)
    seq, kv_heads, head_dim = 2048, 2, 64
    attention = lambda q, k, v, u: blocked.blocked_attention(
        q, k, v, u, jnp.zeros(q.shape[:2], jnp.int32), topk=256, window=256, gate="value", scale=head_dim ** -0.5,
        implementation="triton", block_sizes=sk.BlockSizes().resolve("triton", seq), buffer_size=512,
        interpret=False)

    def forward_backward(q, k, v, u):
        out, vjp = jax.vjp(attention, q, k, v, u)
        return out, vjp(out)

    shapes = [jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.bfloat16) for heads in (6, kv_heads, kv_heads)]
    shapes.append(jax.ShapeDtypeStruct((1, seq, kv_heads), jnp.float32))
    text = jax.jit(forward_backward).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text(debug_info=True)
    for name in ("sparsek_triton_forward", "sparsek_triton_backward_queries", "sparsek_triton_backward_keys",
                 "sparsek_threshold_lanes"):
        assert name in text, f"{name} not lowered"
    print("lowered")
""")


def test_forward_backward_lowers_for_cuda():
    # The whole implementation="triton" forward and backward (Pallas thresholds, the three Triton kernels through
    # jax_triton, the scores' gradient) lowers for CUDA under jax.jit, GQA 3:1, in a process without the
    # interpreter and with the jax CUDA plugin that jax_triton imports.
    if not CUDA_PLUGIN.is_dir():
        pytest.skip(f"the jax CUDA plugin is not installed at {CUDA_PLUGIN} (`make test` installs it: "
                    f"pip install --no-deps --target {CUDA_PLUGIN} jax-cuda12-plugin==0.11.2)")
    env = {"PYTHONPATH": os.pathsep.join([str(CUDA_PLUGIN), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "0"}
    result = _run(["-c", LOWER], env, 600)
    assert result.returncode == 0 and "lowered" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_default_launch_follows_head_dim():
    # Tuned on the H200 at head_dim 64 (64 rows, 4 warps); 4 warps spill registers at head_dim 128.
    from sparsek_kernels import triton_adapter

    defaults = sk.BlockSizes.default("triton")
    fields = dict(rows=None, block_k=defaults.block_k, backward_block_k=defaults.backward_block_k, num_warps=None,
                  num_stages=defaults.num_stages)
    got = {d: triton_adapter.launch(d, **fields) for d in (32, 64, 80, 128, 256)}
    assert {d: (launch.rows, launch.num_warps) for d, launch in got.items()} == {
        32: (64, 4), 64: (64, 4), 80: (64, 8), 128: (64, 8), 256: (32, 8)}
    assert got[256].backward_block_k == 32
    explicit = triton_adapter.launch(64, **dict(fields, rows=128, num_warps=8))
    assert (explicit.rows, explicit.num_warps) == (128, 8)


def test_launch_sizes_are_checked():
    for field, value in (("tile_rows", 24), ("block_k", 8), ("backward_block_k", 48)):
        with pytest.raises(ValueError, match=f"BlockSizes.{field}: expected a power of two >= 16 for triton"):
            sk.BlockSizes(**{field: value}).resolve("triton", 1024)
    with pytest.raises(ValueError, match="backward_block_k: expected at most tile_rows=32"):
        sk.BlockSizes(tile_rows=32, backward_block_k=64).resolve("triton", 1024)


def test_needs_a_gpu_or_the_interpreter(rng):
    q, k, v, u, _ = attention_inputs(rng, 1, 16, 2, 1, 16)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'triton' needs a GPU"):
            sk.sparsek_attention(q, k, v, u, topk=2, window=2, implementation="triton")
    if not _interpreting():
        from sparsek_kernels import triton_attention

        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            triton_attention.forward(q, k, v, u, jnp.zeros((1, 16), jnp.int32), jnp.full((1, 1, 1, 2), -1, jnp.int32),
                                     u, u, jnp.zeros(u.shape, jnp.int32), window=2, anchor_block=16, scale=0.25,
                                     gate="value", launch=triton_attention.Launch(16, 16, 16, 4, 3), interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("seq, q_heads, kv_heads, head_dim, topk, window",
                         [(4096, 12, 12, 64, 1024, 1024), (8192, 12, 4, 128, 256, 256), (3001, 8, 2, 64, 512, 128)])
def test_gpu_matches_xla_path_in_bf16(rng, seq, q_heads, kv_heads, head_dim, topk, window):
    q, k, v, u, _ = attention_inputs(rng, 1, seq, q_heads, kv_heads, head_dim)
    u = u + 1e-3 * jnp.arange(seq, dtype=jnp.float32)[None, :, None]
    bf = lambda x: x.astype(jnp.bfloat16)
    q, k, v = bf(q), bf(k), bf(v)
    cotangent = bf(jnp.asarray(rng.normal(size=q.shape).astype(np.float32)))

    def run(impl):
        f = lambda q, k, v, u: sk.sparsek_attention(q, k, v, u, topk=topk, window=window, implementation=impl)
        out, vjp = jax.vjp(f, q, k, v, u)
        return (out,) + vjp(cotangent)

    got, expected = jax.jit(lambda: run("triton"))(), jax.jit(lambda: run("xla"))()
    np.testing.assert_allclose(got[0].astype(np.float32), expected[0].astype(np.float32), atol=3e-2)
    for name, g, e in zip(("dq", "dk", "dv", "dscores"), got[1:], expected[1:]):
        assert relative_error(g, e) < 2e-2, (name, relative_error(g, e))


@pytest.mark.gpu
def test_gpu_documents_and_gates_match_xla_path(rng):
    # Packed documents and the other gate modes at a size where the band has unmasked steps and tiles cut
    # through documents.
    seq, q_heads, kv_heads, head_dim = 4096, 8, 2, 64
    q, k, v, u, seg = attention_inputs(rng, 2, seq, q_heads, kv_heads, head_dim, segmented=True)
    bf = lambda x: x.astype(jnp.bfloat16)
    q, k, v = bf(q), bf(k), bf(v)
    cotangent = bf(jnp.asarray(rng.normal(size=q.shape).astype(np.float32)))
    for gate in ("logit", "none"):
        def run(impl):
            f = lambda q, k, v, u: sk.sparsek_attention(q, k, v, u, topk=256, window=512, gate=gate,
                                                        segment_ids=seg, implementation=impl)
            out, vjp = jax.vjp(f, q, k, v, u)
            return (out,) + vjp(cotangent)

        got, expected = jax.jit(lambda: run("triton"))(), jax.jit(lambda: run("xla"))()
        np.testing.assert_allclose(got[0].astype(np.float32), expected[0].astype(np.float32), atol=3e-2)
        for name, g, e in zip(("dq", "dk", "dv", "dscores"), got[1:], expected[1:]):
            if gate == "none" and name == "dscores":
                continue
            assert relative_error(g, e) < 2e-2, (gate, name, relative_error(g, e))
