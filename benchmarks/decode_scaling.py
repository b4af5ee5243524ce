"""Decode-step latency and KV-cache bytes against context length: SparseK vs dense layers.

    python -m benchmarks.decode_scaling        # contexts 1k, 4k, 16k, 64k on a small model

The cache is put in the state it has after ``context`` tokens (random keys and values, every slot that
would be occupied occupied), then one jit-compiled ``decode_step`` is timed (minimum of 30 after warm-up).
A dense layer's cache is the usual preallocated one of ``context`` slots; a SparseK layer's holds the
window, the live top-k and the scores that keep ``tau`` exact, whatever the context.
Writes benchmarks/results/decode_scaling_<backend>.json and docs/images/decode_scaling_<backend>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sparsek_jax.nn as sknn
from benchmarks import reporting
from sparsek_jax.kv_cache import AttentionCache


def occupied(cache: AttentionCache, context: int, rng) -> AttentionCache:
    """``cache`` as after ``context`` tokens: random contents, every slot filled that would be."""
    def normal(x):
        return jnp.asarray(rng.normal(size=x.shape), x.dtype)

    ring = cache.ring
    positions = np.arange(context - ring, context)
    window_pos = jnp.asarray(np.where(positions >= 0, positions, -1)[np.argsort(positions % max(ring, 1))], jnp.int32)
    older = max(context - ring, 0)
    topk = cache.topk
    selected = np.stack([np.sort(rng.choice(older, size=topk, replace=False)) for _ in range(
        int(np.prod(cache.selected_pos.shape[:-1])))]).reshape(cache.selected_pos.shape) if topk and older >= topk \
        else np.full(cache.selected_pos.shape, -1)
    return cache._replace(
        window_k=normal(cache.window_k), window_v=normal(cache.window_v), window_u=normal(cache.window_u),
        window_pos=window_pos, selected_k=normal(cache.selected_k), selected_v=normal(cache.selected_v),
        selected_u=normal(cache.selected_u) + 3.0, selected_pos=jnp.asarray(selected, jnp.int32),
        extra_u=normal(cache.extra_u), length=jnp.asarray(context, jnp.int32))


def measure(config: sknn.ModelConfig, context: int, repeats: int, seed: int = 0):
    model = sknn.TransformerLM(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    caches = tuple(occupied(c, context, rng) for c in model.init_cache(1))
    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, token, caches):
        return nnx.merge(graphdef, params).decode_step(token, caches)

    token = jnp.zeros((1,), jnp.int32)
    jax.block_until_ready(step(params, token, caches))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, token, caches))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, sknn.cache_nbytes(caches)


def plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    contexts = [r["context"] for r in rows]
    for kind, marker in (("sparsek", "o"), ("dense", "s")):
        axes[0].plot(contexts, [r[f"{kind}_ms"] for r in rows], marker=marker, label=kind)
        axes[1].plot(contexts, [r[f"{kind}_cache_mib"] for r in rows], marker=marker, label=kind)
    for ax, label in ((axes[0], "decode step, ms"), (axes[1], "KV cache, MiB (whole model)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    base = sknn.ModelConfig(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                            mlp_dim=768, topk=128, window=128, position_slope=1e-3)
    rows = []
    for context in args.contexts:
        row = {"context": context}
        for kind in ("sparsek", "dense"):
            config = dataclasses.replace(base, attention=kind, max_decode_length=context)
            ms, nbytes = measure(config, context, args.repeats)
            row[f"{kind}_ms"], row[f"{kind}_cache_mib"] = ms, nbytes / 2**20
            print(f"context={context:6d} {kind:8s} {ms:7.2f} ms/token  cache {nbytes / 2**20:8.2f} MiB", flush=True)
        row["dense_over_sparsek_ms"] = row["dense_ms"] / row["sparsek_ms"]
        rows.append(row)
    backend = jax.default_backend()
    name = f"decode_scaling_{backend}"
    config = {"model": dataclasses.asdict(base), "contexts": args.contexts, "repeats": args.repeats}
    title = (f"Decoding on {backend}: {base.num_layers} layers, d_model {base.d_model}, "
             f"SparseK topk={base.topk} window={base.window} vs dense")
    reporting.publish(name, config, rows, plot=lambda rows, path: plot(rows, path, title), columns=[
        ("context", "context", "d"), ("sparsek_ms", "SparseK ms/token", ".2f"), ("dense_ms", "dense ms/token", ".2f"),
        ("dense_over_sparsek_ms", "dense / SparseK", ".1f"), ("sparsek_cache_mib", "SparseK cache MiB", ".2f"),
        ("dense_cache_mib", "dense cache MiB", ".1f")])


if __name__ == "__main__":
    main()
