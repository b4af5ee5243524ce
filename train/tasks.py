"""What a run reads: a text corpus (packed documents, with passkeys mixed in when asked) or the synthetic
associative-recall task, for training and for evaluation."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from sparsek_jax import data
from sparsek_jax.data.passkey import MixedExamples, PasskeyExamples
from sparsek_jax.data.recall import AssociativeRecall, RecallVocabulary
from sparsek_train import distributed
from sparsek_train.config import RECALL, RunConfig


def prepare(config: RunConfig, log=print) -> data.PreparedData:
    """The corpus, its tokenizer and token caches (built once), or the recall task's vocabulary."""
    d = config.data
    if d.dataset == RECALL:
        return data.PreparedData(RecallVocabulary(d.recall), {}, Path(d.data_dir))
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    quiet = not distributed.is_main()
    return distributed.once_then_everyone(d.data_dir, lambda: data.prepare_data(
        dataset=d.dataset, data_dir=d.data_dir, source_path=d.source_path, text_key=d.text_key,
        tokenizer_path=d.tokenizer, vocab_size=d.vocab_size, log=(lambda message: None) if quiet else log))


def training_examples(config: RunConfig, prepared: data.PreparedData):
    """The training data source: every example has the fields of ``data.PackedSequences``."""
    d = config.data
    if d.dataset == RECALL:
        return AssociativeRecall(d.recall, d.seq_len, seed=d.seed, split="train")
    split = prepared.splits["train"]
    packed = data.PackedSequences(split, d.seq_len)
    if not d.passkey.fraction:
        return packed
    passkeys = PasskeyExamples(split, prepared.tokenizer, d.seq_len, spec=d.passkey, seed=d.seed,
                               num_examples=len(packed))
    return MixedExamples(packed, passkeys, fraction=d.passkey.fraction, seed=d.seed)


@dataclass(frozen=True)
class EvaluationSet:
    """Held-out examples of one kind: ``documents`` (windows of the validation documents), ``recall`` or
    ``passkey``; ``bytes_per_token`` converts their loss to bits per byte (None for the synthetic task)."""

    name: str
    examples: object
    bytes_per_token: float | None


def evaluation_sets(config: RunConfig, prepared: data.PreparedData, length: int, *,
                    max_windows_per_doc: int | None = None, examples: int | None = None) -> list[EvaluationSet]:
    """What to evaluate at window ``length``: the validation documents (and passkeys hidden in them when the run
    mixes passkeys in or ``eval.passkey`` asks), or fresh recall examples. ``examples``: synthetic examples
    (default ``eval.examples``)."""
    d = config.data
    examples = examples or config.eval.examples
    if d.dataset == RECALL:
        return [EvaluationSet("recall", AssociativeRecall(d.recall, length, seed=d.seed, split="validation",
                                                          num_examples=examples), None)]
    split = prepared.splits["validation"]
    sets = [EvaluationSet("documents", data.DocumentWindows(split, length, max_windows_per_doc=max_windows_per_doc),
                          split.bytes_per_token)]
    passkey = config.eval.passkey if config.eval.passkey is not None else d.passkey.fraction > 0
    if passkey:
        unweighted = replace(d.passkey, answer_weight=1.0)  # held-out loss: every token counts once
        sets.append(EvaluationSet("passkey", PasskeyExamples(split, prepared.tokenizer, length, spec=unweighted,
                                                             seed=d.seed, num_examples=examples, stratified=True),
                                  split.bytes_per_token))
    return sets
