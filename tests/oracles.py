"""Independent float64 NumPy oracles: loops and bisection, sharing no code with the library."""

import numpy as np


def bisect_threshold(z, k):
    """Smallest tau with sum(clip(z - tau, 0, 1)) = k, by bisection in float64; -inf if len(z) <= k."""
    z = np.asarray(z, np.float64)
    if z.size <= k:
        return -np.inf
    lo, hi = z.min() - 1.0, z.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.clip(z - mid, 0.0, 1.0).sum() > k:
            lo = mid
        else:
            hi = mid
    return hi


def sparsek_np(z, k):
    tau = bisect_threshold(z, k)
    return np.clip(np.asarray(z, np.float64) - tau, 0.0, 1.0) if np.isfinite(tau) else np.ones(len(z))


def sparsemax_np(z):
    """Sparsemax (Martins & Astudillo 2016) by its sort-based closed form."""
    z = np.asarray(z, np.float64)
    zs = np.sort(z)[::-1]
    cumsum = np.cumsum(zs)
    ks = np.arange(1, len(z) + 1)
    support = ks[1 + ks * zs > cumsum].max()
    tau = (cumsum[support - 1] - 1) / support
    return np.maximum(z - tau, 0.0)


def topk_newest_first(u, candidates, topk):
    """Indices of the topk candidates ranked by (score, position) descending."""
    order = sorted(candidates, key=lambda j: (u[j], j), reverse=True)
    return set(order[:topk])


def sparsek_attention_np(q, k, v, u, *, topk, window, gate="value", segment_ids=None, scale=None):
    """Loop-by-loop SparseK attention in float64."""
    q, k, v, u = (np.asarray(x, np.float64) for x in (q, k, v, u))
    batch, seq, q_heads, dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    seg = np.zeros((batch, seq), int) if segment_ids is None else np.asarray(segment_ids)
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(q_heads):
            hk = h // group
            for i in range(seq):
                doc = [j for j in range(i + 1) if seg[b, j] == seg[b, i]]
                win = [j for j in doc if j > i - window]
                cand = [j for j in doc if j <= i - window]
                sel = topk_newest_first(u[b, :, hk], cand, topk) if topk > 0 else set()
                tau = bisect_threshold(u[b, cand, hk], topk) if topk > 0 else np.inf
                keys = sorted(set(win) | sel)
                if not keys:
                    continue
                logits = np.array([q[b, i, h] @ k[b, j, hk] * scale for j in keys])
                gates = np.array([1.0 if j in win else np.clip(u[b, j, hk] - tau, 0, 1) for j in keys])
                if gate == "logit":
                    logits = logits + np.log(gates)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                if gate == "value":
                    p = p * gates
                out[b, i, h] = p @ v[b, keys, hk]
    return out


def block_topk_attention_np(q, k, v, *, topk, window, block_size, segment_ids=None, scale=None):
    """Loop-by-loop query-dependent block top-k attention in float64: per query, its candidates grouped by
    block, each block scored by q . (mean of its candidates' keys), the topk // block_size best (ties: lower
    block first) joining the window in one plain softmax."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, seq, q_heads, dim = q.shape
    group = q_heads // k.shape[2]
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    seg = np.zeros((batch, seq), int) if segment_ids is None else np.asarray(segment_ids)
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(q_heads):
            hk = h // group
            for i in range(seq):
                doc = [j for j in range(i + 1) if seg[b, j] == seg[b, i]]
                win = [j for j in doc if j > i - window]
                blocks = {}
                for j in doc:
                    if j <= i - window:
                        blocks.setdefault(j // block_size, []).append(j)
                pooled = {c: q[b, i, h] @ k[b, members, hk].mean(axis=0) for c, members in blocks.items()}
                best = sorted(blocks, key=lambda c: (-pooled[c], c))[: topk // block_size]
                keys = sorted(set(win).union(*(blocks[c] for c in best)))
                if not keys:
                    continue
                logits = np.array([q[b, i, h] @ k[b, j, hk] * scale for j in keys])
                p = np.exp(logits - logits.max())
                out[b, i, h] = (p / p.sum()) @ v[b, keys, hk]
    return out
