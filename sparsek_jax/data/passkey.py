"""Passkey retrieval in real text: a number hidden at some depth of a document, asked for at the end.

An example is a stretch of one document with a needle inserted at ``depth`` (a fraction of the text):
``" The pass key is 71432. Remember it. 71432 is the pass key."``, followed at the end of the sequence by
``" What is the pass key? The pass key is 71432"``. The answer is the number's tokens at the end;
``answer_source`` points each of them at the same token in the needle, so accuracy can be read by depth and
distance. Every piece is tokenized on its own, so the number's tokens are the same in the needle and the
answer. Training mixes these into ordinary language-model batches (``MixedExamples``); the loss stays the
language-model loss over every token, with the answer's tokens weighted ``answer_weight`` times the text's.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sparsek_jax.data.pipeline import TokenizedSplit

NEEDLE = (" The pass key is", ". Remember it.", " is the pass key.")
QUESTION = " What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeySpec:
    fraction: float = 0.0         # share of training sequences that carry a passkey (0: none)
    digits: int = 5               # digits of the number
    depth: float | None = None    # the needle's place in the text, 0 (start) to 1 (end); None: uniform
    answer_weight: float = 1.0    # training loss weight of the answer's tokens against the text's (1: plain LM loss)

    def __post_init__(self):
        if not (isinstance(self.fraction, (int, float)) and math.isfinite(self.fraction)
                and 0.0 <= self.fraction <= 1.0):
            raise ValueError(f"passkey.fraction: expected a number in [0, 1], received {self.fraction!r}")
        if isinstance(self.digits, bool) or not isinstance(self.digits, int) or not 1 <= self.digits <= 18:
            raise ValueError(f"passkey.digits: expected an int in [1, 18], received {self.digits!r}")
        if self.depth is not None and not (isinstance(self.depth, (int, float)) and 0.0 <= self.depth <= 1.0):
            raise ValueError(f"passkey.depth: expected null or a number in [0, 1], received {self.depth!r}")
        if not (isinstance(self.answer_weight, (int, float)) and not isinstance(self.answer_weight, bool)
                and math.isfinite(self.answer_weight) and self.answer_weight > 0):
            raise ValueError(f"passkey.answer_weight: expected a finite number > 0, received {self.answer_weight!r}")


class PasskeyExamples:
    """Random-access passkey examples of ``seq_len`` inputs from the documents of ``split``.

    Fields as ``PackedSequences`` (one document: ``segment_ids`` all 1, ``positions`` 0..seq_len-1),
    ``loss_mask`` (1 on the text, ``spec.answer_weight`` on the answer) and ``answer_source``. With
    ``stratified`` the depths of examples ``0..n-1`` are ``(i + 0.5) / n`` (evaluation), else ``spec.depth``
    or uniform at random.
    """

    def __init__(self, split: TokenizedSplit, tokenizer, seq_len: int, *, spec: PasskeySpec, seed: int,
                 num_examples: int = 2**20, stratified: bool = False):
        self.split, self.tokenizer, self.seq_len, self.spec = split, tokenizer, seq_len, spec
        self.seed, self.num_examples, self.stratified = seed, num_examples, stratified
        self.intro, self.remember, self.closing = (tokenizer.encode(t) for t in NEEDLE)
        self.question = tokenizer.encode(QUESTION)
        longest_number = len(tokenizer.encode(" " + "9" * spec.digits)) + 2  # BPE may split a number unevenly
        fixed = len(self.intro) + len(self.remember) + len(self.closing) + len(self.question) + 3 * longest_number
        self.min_text = 16
        if seq_len + 1 < fixed + self.min_text:
            raise ValueError(f"seq_len: expected at least {fixed + self.min_text - 1} tokens for a passkey "
                             f"example (needle, question and {self.min_text} tokens of text), received {seq_len}")
        self.documents = np.flatnonzero(split.doc_lengths >= seq_len + 1)
        if len(self.documents) == 0:
            raise ValueError(f"seq_len: expected a document of at least {seq_len + 1} tokens for passkey "
                             f"examples, but the longest has {int(split.doc_lengths.max(initial=0))}")

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        rng = np.random.default_rng([self.seed, index])
        number = self.tokenizer.encode(f" {int(rng.integers(10 ** (self.spec.digits - 1), 10 ** self.spec.digits))}")
        needle = [self.intro, number, self.remember, number, self.closing]
        needle_length = sum(len(p) for p in needle)
        n = self.seq_len + 1
        text_length = n - needle_length - len(self.question) - len(number)
        doc = int(self.documents[rng.integers(len(self.documents))])
        offset = int(rng.integers(0, self.split.doc_lengths[doc] - text_length + 1))
        text = np.asarray(self.split.document(doc)[offset:offset + text_length], np.int32)
        if self.stratified:
            depth = (index + 0.5) / self.num_examples
        else:
            depth = self.spec.depth if self.spec.depth is not None else rng.uniform()
        cut = int(round(depth * text_length))
        stream = np.concatenate([text[:cut], *needle, text[cut:], self.question, number]).astype(np.int32)
        answer_start = n - len(number)  # stream position of the answer's first token
        source = np.full(self.seq_len, -1, np.int32)
        # Input position t predicts stream token t + 1; the answer's tokens copy the needle's first number.
        source[answer_start - 1:] = cut + len(self.intro) + np.arange(len(number))
        loss_mask = np.where(source >= 0, self.spec.answer_weight, 1.0).astype(np.float32)
        return {"inputs": stream[:-1], "targets": stream[1:], "loss_mask": loss_mask,
                "segment_ids": np.ones(self.seq_len, np.int32),
                "positions": np.arange(self.seq_len, dtype=np.int32), "answer_source": source}


class MixedExamples:
    """``base`` examples with a share ``fraction`` replaced by ``extra``'s of the same index (a fixed choice
    per index and seed, so the mixture is a deterministic data source)."""

    def __init__(self, base, extra, *, fraction: float, seed: int):
        self.base, self.extra, self.fraction, self.seed = base, extra, fraction, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        chosen = np.random.default_rng([self.seed, int(index), 1]).uniform() < self.fraction
        return (self.extra if chosen else self.base)[index]
