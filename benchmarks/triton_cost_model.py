"""The cost model of the Triton attention kernels, against the Pallas GPU kernels': work, bytes and predicted time.

    python -m benchmarks.triton_cost_model                      # the 64k benchmark case, 12:12 and 12:4
    python -m benchmarks.triton_cost_model --kv-heads 4 --tokens 131072

No GPU, no JAX: the step counts are the kernels' own loop bounds (the same integer formulas, walked tile by tile),
so the pairs counted are the pairs computed, masked or not. Per kernel: matrix-unit FLOPs (2 per multiply-add),
exponentials, elementwise operations (an estimate per (row, key) pair: about 17 on steps that rebuild the pattern,
25-30 in the backward's, 4-8 on unmasked steps), bytes to and from HBM (each array once: neighbouring tiles
that run together re-read keys from L2, not HBM), bytes that L2 serves again, and the anchors' float32 atomics.

Predicted time: at least the largest of the matrix units (790 TFLOP/s), the exponentials (16 per clock per SM:
132 SMs at 1.98 GHz, 4.2 T/s), the elementwise operations (128 lanes per clock per SM, 33 T/s) and HBM (3.3 to
4.3 TB/s); at most their sum (nothing overlapped). L2 bandwidth and the atomics' rate are not modelled (not
published for the H200; what only a measurement can say). Writes benchmarks/results/triton_cost_model.json.
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

MATMUL_FLOPS = 790e12
EXP_RATE = 132 * 16 * 1.98e9
ALU_RATE = 132 * 128 * 1.98e9
HBM = (4.3e12, 3.3e12)  # bytes/s: fastest, slowest
BF16, F32, I32 = 2, 4, 4


class Case(NamedTuple):
    tokens: int      # one sequence of this length
    heads: int
    kv_heads: int
    head_dim: int
    topk: int
    window: int


class Launch(NamedTuple):
    rows: int = 128           # rows per tile
    block_k: int = 64         # forward keys per step
    backward_block_k: int = 32
    anchor_block: int = 64    # queries per anchor list


def cdiv(a, b):
    return -(-a // b)


def tile_span(t, c: Case, g: int, launch: Launch):
    i_first = t * launch.rows // g
    i_last = min((t * launch.rows + launch.rows - 1) // g, c.tokens - 1)
    block = i_first // launch.anchor_block
    return i_first, i_last, max(block * launch.anchor_block - c.window + 1, 0)


def band_steps(t, c: Case, g: int, launch: Launch, step: int):
    """(masked, unmasked) band steps of row tile ``t`` (``_band_steps``; one document)."""
    i_first, i_last, start = tile_span(t, c, g, launch)
    n = cdiv(i_last - start + 1, step)
    hi = min((i_first + 1 - start) // step, n)
    lo = min(cdiv(max(i_last - c.window + 1 - start, 0), step), hi)
    return lo + n - hi, hi - lo


def key_steps(block, c: Case, g: int, launch: Launch):
    """(masked, unmasked) row steps of the key-major program of key block ``block`` (``_backward_keys_kernel``)."""
    keys, step = launch.rows, launch.backward_block_k
    j0 = block * keys
    j_last = min(j0 + keys - 1, c.tokens - 1)
    num_steps = cdiv(c.tokens * g, step)
    first = j0 * g // step
    blocks = (j_last + c.window - 1 + launch.anchor_block) // launch.anchor_block
    last = min(cdiv(blocks * g * launch.anchor_block, launch.rows) * (launch.rows // step), num_steps)
    lo = min(max(cdiv((j0 + keys - 1) * g, step), first), last)
    hi = min(max((j0 + c.window) * g // step, lo), last)
    if j0 + keys > c.tokens:
        lo = hi = last
    return lo - first + last - hi, hi - lo


def row(name, *, flops, exps, alu, hbm, l2=0.0, atomics=0.0, useful=None):
    t_mma, t_exp, t_alu = flops / MATMUL_FLOPS, exps / EXP_RATE, alu / ALU_RATE
    t_hbm = tuple(hbm / bw for bw in HBM)
    low = max(t_mma, t_exp, t_alu, t_hbm[0])
    high = t_mma + t_exp + t_alu + t_hbm[1]
    return {"kernel": name, "tflop": flops / 1e12, "useful_tflop": None if useful is None else useful / 1e12,
            "gexp": exps / 1e9, "alu_gop": alu / 1e9, "hbm_gb": hbm / 1e9, "l2_reread_gb": l2 / 1e9,
            "atomic_gb": atomics / 1e9, "mma_ms": t_mma * 1e3, "exp_ms": t_exp * 1e3, "alu_ms": t_alu * 1e3,
            "hbm_ms": f"{t_hbm[0] * 1e3:.2f}-{t_hbm[1] * 1e3:.2f}", "predicted_ms": f"{low * 1e3:.2f}-{high * 1e3:.2f}"}


def triton_rows(c: Case, launch: Launch):
    g = c.heads // c.kv_heads
    d, anchors = c.head_dim, min(c.topk, c.tokens)
    tiles = cdiv(c.tokens * g, launch.rows)
    q_rows = c.tokens * c.heads
    kv = c.tokens * c.kv_heads
    useful_keys = sum(min(i + 1, c.window) + min(max(i - c.window + 1, 0), c.topk) for i in range(c.tokens))
    useful = 4 * c.heads * d * useful_keys

    def query_major(step):
        masked = unmasked = 0
        for t in range(tiles):
            m, u = band_steps(t, c, g, launch, step)
            masked, unmasked = masked + m, unmasked + u
        anchor_steps = tiles * cdiv(anchors, step)
        scale = c.kv_heads * launch.rows * step  # (row, key) pairs per step, all KV heads
        return masked * scale, unmasked * scale, anchor_steps * scale

    selection = kv * (3 * F32 + I32) + c.tokens * I32                 # u, tau, theta, theta_pos; documents
    anchor_lists = cdiv(c.tokens, launch.anchor_block) * c.kv_heads * anchors * I32
    rows_out = q_rows * F32
    band_m, band_u, anchor = query_major(launch.block_k)
    pairs = band_m + band_u + anchor
    forward = row("forward", flops=4 * d * pairs, exps=pairs, alu=17 * (band_m + anchor) + 4.5 * band_u,
                  hbm=q_rows * d * BF16 + 2 * kv * d * BF16 + selection + anchor_lists + q_rows * d * F32 + rows_out,
                  l2=(pairs / launch.rows) * 2 * d * BF16, useful=useful)
    band_m, band_u, anchor = query_major(launch.backward_block_k)
    pairs = band_m + band_u + anchor
    atomics = tiles * c.kv_heads * anchors * (2 * d + 1) * F32
    accumulators = 2 * kv * d * F32 + kv * F32
    queries = row("backward_queries", flops=2 * d * (3 * (band_m + band_u) + 5 * anchor), exps=pairs,
                  alu=25 * band_m + 8 * band_u + 30 * anchor,
                  hbm=2 * q_rows * d * BF16 + q_rows * d * F32 + rows_out + 2 * kv * d * BF16 + selection
                  + anchor_lists + q_rows * d * F32 + 2 * rows_out + 2 * accumulators,
                  l2=(pairs / launch.rows) * 2 * d * BF16, atomics=atomics)
    masked = unmasked = 0
    for block in range(cdiv(c.tokens, launch.rows)):
        m, u = key_steps(block, c, g, launch)
        masked, unmasked = masked + m, unmasked + u
    scale = c.kv_heads * launch.rows * launch.backward_block_k
    band_m, band_u = masked * scale, unmasked * scale
    keys = row("backward_keys", flops=8 * d * (band_m + band_u), exps=band_m + band_u,
               alu=25 * band_m + 8 * band_u,
               hbm=2 * kv * d * BF16 + selection + 2 * rows_out + 2 * q_rows * d * BF16 + 2 * accumulators,
               l2=((band_m + band_u) / launch.rows) * 2 * d * BF16)
    return [forward, queries, keys]


def pallas_rows(c: Case, block_q=64, block_k=32, blocks_per_group=16):
    """The Pallas GPU kernels (``sparsek_kernels.gpu``) at their defaults: tiles of ``block_q`` queries x the
    group's heads padded to a power of two, every step masked, layout copies around the kernels, key-major
    partial sums per super-block of ``blocks_per_group`` blocks segment-summed by XLA."""
    g = c.heads // c.kv_heads
    d, anchors = c.head_dim, min(c.topk, c.tokens)
    tile_rows = 1 << (block_q * g - 1).bit_length()
    blocks = cdiv(c.tokens, block_q)
    slots = cdiv(c.window + block_q - 1, block_k) * block_k + cdiv(anchors, block_k) * block_k
    pairs = c.kv_heads * blocks * tile_rows * slots
    q_rows = c.tokens * c.heads
    kv = c.tokens * c.kv_heads
    layout = 2 * (q_rows * d * BF16 + 2 * kv * d * BF16) + 2 * q_rows * d * F32  # tiles in, output tiles out
    forward = row("Pallas forward", flops=4 * d * pairs, exps=pairs, alu=17 * pairs,
                  hbm=q_rows * d * BF16 + 2 * kv * d * BF16 + q_rows * d * F32 + layout,
                  l2=c.kv_heads * blocks * slots * 2 * d * BF16)
    queries = row("Pallas backward_queries", flops=2 * d * 3 * pairs, exps=pairs, alu=25 * pairs,
                  hbm=2 * q_rows * d * BF16 + 2 * q_rows * d * F32 + 2 * kv * d * BF16 + layout,
                  l2=c.kv_heads * blocks * slots * 2 * d * BF16)
    group = block_q * blocks_per_group
    groups = cdiv(c.tokens, group)
    contiguous = cdiv(c.window + group - 1, block_k) * block_k
    key_pairs = 0
    for slot in range(0, contiguous, block_k):
        first_block = max((slot - c.window + 1) // block_q, 0)
        key_pairs += block_k * (blocks_per_group - min(first_block, blocks_per_group)) * block_q
    key_pairs = (key_pairs + cdiv(anchors, block_k) * block_k * group) * tile_rows // block_q * groups * c.kv_heads
    partials = groups * c.kv_heads * (contiguous + anchors) * (2 * d + 1) * F32
    keys = row("Pallas backward_keys + segment sums", flops=8 * d * key_pairs, exps=key_pairs, alu=25 * key_pairs,
               hbm=2 * partials + 2 * kv * d * F32 + 2 * q_rows * d * BF16, atomics=partials,
               l2=key_pairs / block_k * 2 * d * BF16)
    return [forward, queries, keys]


COLUMNS = [("kernel", "kernel", "s"), ("tflop", "TFLOP", ".2f"), ("useful_tflop", "of which useful", ".2f"),
           ("gexp", "G exp", ".2f"),
           ("alu_gop", "G elementwise ops", ".0f"), ("hbm_gb", "HBM GB", ".2f"), ("l2_reread_gb", "L2 re-read GB", ".1f"),
           ("atomic_gb", "atomics / partials GB", ".1f"), ("mma_ms", "matmul ms", ".2f"), ("exp_ms", "exp ms", ".2f"),
           ("alu_ms", "elementwise ms", ".2f"), ("hbm_ms", "HBM ms", "s"), ("predicted_ms", "predicted ms", "s")]


def main(argv=None):
    from benchmarks import reporting

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[12, 4])
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    rows = []
    for kv_heads in args.kv_heads:
        case = Case(args.tokens, 12, kv_heads, args.head_dim, 1024, 1024)
        for r in triton_rows(case, Launch()) + pallas_rows(case):
            rows.append({"heads": f"12:{kv_heads}", **r})
    reporting.publish("triton_cost_model", vars(args), rows, columns=[("heads", "heads", "s")] + COLUMNS)


if __name__ == "__main__":
    main()
