"""Evaluation: token-weighted perplexity and bits per byte on held-out long documents, by position bucket,
at window lengths up to and beyond the training context; for tasks with answers (associative recall,
passkeys), answer accuracy by distance and depth and, in SparseK layers, whether each answer's source was in
the window, selected (gate 1 or fractional) or not attended.

    sparsek-eval CONFIG checkpoint=RUN_DIR [key=value ...]
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparsek_jax import data
from sparsek_jax.diagnostics import KEY_STATUS, key_status
from sparsek_train import distributed, tasks
from sparsek_jax.nn.sharding import activate


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


def distance_edges(length: int) -> list[int]:
    """Doubling buckets of how far back an answer's source lies: 1-2, 2-4, ..., up to ``length``."""
    edges = [1]
    while edges[-1] < length:
        edges.append(edges[-1] * 2)
    return edges


DEPTH_BUCKETS = 10


def _label(lo: int, hi: int) -> str:
    short = lambda x: f"{x // 1024}k" if x % 1024 == 0 and x else str(x)
    return f"{short(lo)}-{short(hi)}"


@functools.cache
def make_eval_step(config, *, answers: bool):
    """The jitted evaluation of one batch: per-token loss (masked), whether the argmax is the target, and with
    ``answers`` the ``KEY_STATUS`` of each answer's source in every SparseK layer (``[layers, batch, seq,
    kv_heads]``, -1 off the answers; ``None`` without SparseK layers). One step function per model config:
    evaluations in one process share its compiled programs."""
    sparsek_layers = [i for i, kind in enumerate(config.layer_kinds) if kind == "sparsek"]

    @nnx.jit
    def step(model, batch):
        logits, scores = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                               return_scores=True)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * batch["loss_mask"]
        correct = jnp.argmax(logits, axis=-1) == batch["targets"]
        if not (answers and sparsek_layers):
            return nll, correct, None
        status = [key_status(scores[layer], batch["answer_source"], topk=config.topk, window=config.window,
                             segment_ids=batch["segment_ids"], buffer_size=config.buffer_size)
                  for layer in sparsek_layers]
        return nll, correct, jnp.stack(status)

    step.sparsek_layers = sparsek_layers
    return step


class _Answers:
    """Answer accuracy by distance and depth, and where each answer's source stood in the SparseK layers."""

    def __init__(self, length: int, layers: list[int]):
        self.length, self.layers = length, layers
        self.distance = distance_edges(length)
        self.by_distance = np.zeros((2, len(self.distance) - 1))          # answers, correct
        self.by_depth = np.zeros((4, DEPTH_BUCKETS))  # by the sequence's depth: answers, correct, sequences, all right
        self.status = np.zeros((len(layers), 2, len(KEY_STATUS)))          # per head, best head
        self.status_by_distance = np.zeros((len(layers), len(self.distance) - 1, len(KEY_STATUS)))

    def add(self, local: dict, correct: np.ndarray, status: np.ndarray | None) -> None:
        source = local["answer_source"]
        asked = (source >= 0) & (local["loss_mask"] > 0)
        if not asked.any():
            return
        rows, cols = np.nonzero(asked)
        bucket = np.searchsorted(self.distance, cols - source[rows, cols], side="right") - 1
        np.add.at(self.by_distance[0], bucket, 1)
        np.add.at(self.by_distance[1], bucket, correct[rows, cols])
        for row in np.unique(rows):  # a sequence's depth: where its first source lies; right: all answers are
            mine = asked[row]
            depth = min(int(source[row][mine].min() / self.length * DEPTH_BUCKETS), DEPTH_BUCKETS - 1)
            self.by_depth[:, depth] += (mine.sum(), correct[row][mine].sum(), 1, correct[row][mine].all())
        if status is None:
            return
        codes = status[:, rows, cols, :]  # [layers, answers, kv_heads]
        best = codes.min(axis=-1)
        for s in range(len(KEY_STATUS)):
            self.status[:, 0, s] += (codes == s).mean(axis=-1).sum(axis=-1)
            self.status[:, 1, s] += (best == s).sum(axis=-1)
            for layer in range(len(self.layers)):
                np.add.at(self.status_by_distance[layer, :, s], bucket, best[layer] == s)

    def report(self) -> dict | None:
        answers = self.by_distance[0].sum()
        if not answers:
            return None
        fraction = lambda counts: {name: float(c / max(counts.sum(), 1)) for name, c in zip(KEY_STATUS, counts)}
        return {
            "answers": int(answers), "accuracy": float(self.by_distance[1].sum() / answers),
            "sequences": int(self.by_depth[2].sum()),
            "sequence_accuracy": float(self.by_depth[3].sum() / max(self.by_depth[2].sum(), 1)),
            "by_distance": [{"distance": _label(self.distance[b], self.distance[b + 1]), "answers": int(n),
                             "accuracy": float(c / n)} for b, (n, c) in enumerate(self.by_distance.T) if n],
            "by_depth": [{"depth": f"{b / DEPTH_BUCKETS:.1f}-{(b + 1) / DEPTH_BUCKETS:.1f}", "answers": int(n),
                          "accuracy": float(c / n), "sequences": int(m), "sequence_accuracy": float(r / max(m, 1))}
                         for b, (n, c, m, r) in enumerate(self.by_depth.T) if n],
            "selection": [{"layer": layer, "per_head": fraction(self.status[i, 0]),
                           "best_head": fraction(self.status[i, 1]),
                           "best_head_by_distance": [
                               {"distance": _label(self.distance[b], self.distance[b + 1]),
                                **fraction(self.status_by_distance[i, b])}
                               for b in range(len(self.distance) - 1) if self.by_distance[0, b]]}
                          for i, layer in enumerate(self.layers)],
        }


def evaluate(model, examples, *, batch_size: int, bytes_per_token: float | None = None, sharding=None,
             max_batches: int | None = None, step_fn=None) -> dict:
    """Token-weighted loss and perplexity over ``examples`` (``DocumentWindows`` or any source with the same
    fields), per position bucket; bits per byte when ``bytes_per_token`` is given; and, for examples with
    answers (``answer_source``), their accuracy by distance and depth and, in SparseK layers, where each
    answer's source stood (``KEY_STATUS``: window, gate 1, fractional gate, not attended)."""
    step_fn = step_fn or make_eval_step(model.config, answers=True)
    length = examples.seq_len
    edges = bucket_edges(length)
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1)
    bucket_of = np.searchsorted(edges, np.arange(length), side="right") - 1
    answers = _Answers(length, step_fn.sparsek_layers)
    batches = data.evaluation_batches(examples, global_batch_size=batch_size)
    for index, local in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        local = {k: v for k, v in local.items() if k not in ("doc", "window")}
        batch = data.global_batch(local, sharding) if sharding is not None else local
        # Every process evaluates its share and tallies the whole batch (process 0 writes the results).
        nll, correct, status = distributed.gather(step_fn(model, batch))
        local = distributed.gather(local)
        mask = local["loss_mask"]
        np.add.at(sums, bucket_of, np.asarray(nll, np.float64).sum(0))
        np.add.at(counts, bucket_of, mask.sum(0))
        answers.add(local, np.asarray(correct), None if status is None else np.asarray(status))
    total, tokens = sums.sum(), counts.sum()
    loss = total / max(tokens, 1)
    bits = (lambda nats: nats / math.log(2) / bytes_per_token) if bytes_per_token else (lambda nats: None)
    result = {"length": length, "tokens": int(tokens), "loss": loss, "perplexity": math.exp(min(loss, 50)),
              "bits_per_byte": bits(loss), "buckets": []}
    for b in range(len(edges) - 1):
        if counts[b]:
            bucket_loss = sums[b] / counts[b]
            result["buckets"].append({"positions": _label(edges[b], edges[b + 1]), "tokens": int(counts[b]),
                                      "loss": bucket_loss, "perplexity": math.exp(min(bucket_loss, 50)),
                                      "bits_per_byte": bits(bucket_loss)})
    report = answers.report()
    if report is not None:
        result["answers"] = report
    return result


def _number(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(results: list[dict], train_seq_len: int) -> str:
    """Loss by position bucket of every result; answer accuracy by distance and depth, and the selection
    diagnosis of SparseK layers, where there are answers."""
    lines = ["| set | eval length | positions | tokens | loss | perplexity | bits/byte |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        note = " (beyond training context)" if r["length"] > train_seq_len else ""
        lines.append(f"| {r.get('set', '')} | {r['length']}{note} | all | {r['tokens']:,} | {r['loss']:.4f} | "
                     f"{r['perplexity']:.2f} | {_number(r['bits_per_byte'])} |")
        for b in r["buckets"]:
            lines.append(f"| | | {b['positions']} | {b['tokens']:,} | {b['loss']:.4f} | {b['perplexity']:.2f} | "
                         f"{_number(b['bits_per_byte'])} |")
    for r in results:
        a = r.get("answers")
        if a is None:
            continue
        lines += ["", f"{r.get('set', 'answers')} at length {r['length']}: {a['answers']:,} answers, accuracy "
                      f"{a['accuracy']:.3f}, {a['sequences']:,} sequences all right {a['sequence_accuracy']:.3f}",
                  "", "| distance | answers | accuracy |", "|---|---|---|"]
        lines += [f"| {b['distance']} | {b['answers']:,} | {b['accuracy']:.3f} |" for b in a["by_distance"]]
        lines += ["", "| depth | sequences | all answers right | answer accuracy |", "|---|---|---|---|"]
        lines += [f"| {b['depth']} | {b['sequences']:,} | {b['sequence_accuracy']:.3f} | {b['accuracy']:.3f} |"
                  for b in a["by_depth"]]
        if a["selection"]:
            lines += ["", "where each answer's source stood (best head; per head in brackets):", "",
                      "| layer | " + " | ".join(KEY_STATUS) + " |", "|---" * (len(KEY_STATUS) + 1) + "|"]
            lines += [f"| {s['layer']} | " + " | ".join(f"{s['best_head'][k]:.3f} ({s['per_head'][k]:.3f})"
                                                       for k in KEY_STATUS) + " |" for s in a["selection"]]
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
    lengths = config.eval.lengths or (config.data.eval_seq_len,)
    results = []
    try:
        for length in lengths:
            for evaluation_set in tasks.evaluation_sets(config, session.prepared, length,
                                                        max_windows_per_doc=config.eval.max_windows_per_doc):
                print(f"evaluating {len(evaluation_set.examples)} {evaluation_set.name} windows of {length} "
                      "tokens ...", flush=True)
                with activate(session.mesh):
                    result = evaluate(session.model, evaluation_set.examples, batch_size=config.eval.batch_size,
                                      bytes_per_token=evaluation_set.bytes_per_token,
                                      sharding=session.batch_sharding)
                results.append({"set": evaluation_set.name, **result})
    except ValueError as error:  # e.g. a passkey length no validation document reaches
        print(f"sparsek-eval: {error}", file=sys.stderr)
        return 2
    output = Path(config.eval.output) if config.eval.output else session.run_dir / "eval.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"checkpoint_step": session.step, "results": results}, indent=2))
    print(format_table(results, config.data.seq_len))
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
