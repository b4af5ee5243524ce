"""Evaluation: token-weighted perplexity and bits per byte on held-out long documents, by position bucket,
at window lengths up to and beyond the training context.

    sparsek-eval CONFIG checkpoint=RUN_DIR [key=value ...]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from sparsek_jax import data
from sparsek_train.sharding import activate


def bucket_edges(length: int) -> list[int]:
    """Doubling buckets of the predicting token's position inside its window: 0-1k, 1k-2k, 2k-4k, ... for
    long windows; a window shorter than 4k starts at a quarter of its length (e.g. 0-256, 256-512, 512-1k)."""
    base = 1024
    while base > 1 and base * 4 > length:
        base //= 2
    edges = [0, base]
    while edges[-1] * 2 < length:
        edges.append(edges[-1] * 2)
    return edges + [length] if edges[-1] < length else edges


def _label(lo: int, hi: int) -> str:
    short = lambda x: f"{x // 1024}k" if x % 1024 == 0 and x else str(x)
    return f"{short(lo)}-{short(hi)}"


def make_eval_step():
    @nnx.jit
    def step(model, batch):
        logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return nll * batch["loss_mask"]
    return step


def evaluate(model, windows: data.DocumentWindows, *, batch_size: int, bytes_per_token: float, sharding=None,
             max_batches: int | None = None, step_fn=None) -> dict:
    """Token-weighted loss, perplexity and bits per byte over ``windows``, also per position bucket."""
    step_fn = step_fn or make_eval_step()
    length = windows.seq_len
    edges = bucket_edges(length)
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1)
    bucket_of = np.searchsorted(edges, np.arange(length), side="right") - 1
    batches = data.evaluation_batches(windows, global_batch_size=batch_size)
    for index, local in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        local = {k: v for k, v in local.items() if k not in ("doc", "window")}
        batch = data.global_batch(local, sharding) if sharding is not None else local
        nll = np.asarray(jax.device_get(step_fn(model, batch)), np.float64)
        mask = local["loss_mask"]
        np.add.at(sums, bucket_of, nll.sum(0))
        np.add.at(counts, bucket_of, mask.sum(0))
    total, tokens = sums.sum(), counts.sum()
    loss = total / max(tokens, 1)
    result = {"length": length, "tokens": int(tokens), "loss": loss, "perplexity": math.exp(min(loss, 50)),
              "bits_per_byte": loss / math.log(2) / bytes_per_token, "buckets": []}
    for b in range(len(edges) - 1):
        if counts[b]:
            bucket_loss = sums[b] / counts[b]
            result["buckets"].append({"positions": _label(edges[b], edges[b + 1]), "tokens": int(counts[b]),
                                      "loss": bucket_loss, "perplexity": math.exp(min(bucket_loss, 50)),
                                      "bits_per_byte": bucket_loss / math.log(2) / bytes_per_token})
    return result


def format_table(results: list[dict], train_seq_len: int) -> str:
    lines = ["| eval length | positions | tokens | loss | perplexity | bits/byte |", "|---|---|---|---|---|---|"]
    for r in results:
        note = " (beyond training context)" if r["length"] > train_seq_len else ""
        lines.append(f"| {r['length']}{note} | all | {r['tokens']:,} | {r['loss']:.4f} | {r['perplexity']:.2f} | "
                     f"{r['bits_per_byte']:.4f} |")
        for b in r["buckets"]:
            lines.append(f"| | {b['positions']} | {b['tokens']:,} | {b['loss']:.4f} | {b['perplexity']:.2f} | "
                         f"{b['bits_per_byte']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from sparsek_train import app
    from sparsek_train.checkpointing import CheckpointError

    config, code = app.parse_config("sparsek-eval", __doc__, argv)
    if config is None:
        return code
    if config.checkpoint is None:
        print("sparsek-eval: checkpoint: expected a run directory or checkpoint path (checkpoint=PATH), "
              "received nothing", file=sys.stderr)
        return 2
    try:
        session = app.load_session(config, with_optimizer=False)
    except (ValueError, CheckpointError) as error:
        print(f"sparsek-eval: {error}", file=sys.stderr)
        return 2
    split = session.prepared.splits["validation"]
    lengths = config.eval.lengths or (config.data.eval_seq_len,)
    results = []
    for length in lengths:
        windows = data.DocumentWindows(split, length, max_windows_per_doc=config.eval.max_windows_per_doc)
        print(f"evaluating {len(windows)} windows of {length} tokens ...", flush=True)
        with activate(session.mesh):
            results.append(evaluate(session.model, windows, batch_size=config.eval.batch_size,
                                    bytes_per_token=split.bytes_per_token, sharding=session.batch_sharding))
    output = Path(config.eval.output) if config.eval.output else session.run_dir / "eval.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"checkpoint_step": session.step, "results": results}, indent=2))
    print(format_table(results, config.data.seq_len))
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
