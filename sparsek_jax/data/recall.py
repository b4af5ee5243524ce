"""Associative recall: a synthetic long-range task whose answers lie a known distance back.

A sequence holds ``pairs`` key-value pairs (``k v``, keys distinct, values drawn with replacement) and,
later, every key again followed by its value; the model is trained and scored on predicting each value from
its second key (``loss_mask``). The rest is filler drawn from its own vocabulary, so nothing but the earlier
pair tells the value. Two layouts:

- ``blocked``: all pairs at the start, all queries (in random order) at the end, filler between: every query
  lies ``seq_len - 4 pairs`` or more tokens after its pair, beyond any short window.
- ``random``: each pair and its query at random places, the distance from the value to the query drawn
  log-uniformly from ``[min_distance, seq_len - 2]``, so accuracy can be read by distance.

``random_fraction`` mixes random-layout sequences into the training split of a blocked task: a small model
learns the lookup (an induction head) from the nearby queries of the random layout within minutes, and from
far queries alone only after a long plateau; evaluation (``split="validation"``) keeps the layout pure.

Every example records ``answer_source``: at each position whose target is an answer, the position of the
token the answer copies (the pair's value); -1 elsewhere. Examples are a pure function of ``(seed, index)``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

LAYOUTS = ("blocked", "random")
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class RecallSpec:
    """The task's shape. Token ids: 0 is end-of-text (unused), then ``num_keys`` keys, ``num_values`` values
    and ``num_filler`` filler tokens."""

    layout: str = "blocked"
    pairs: int = 8
    num_keys: int = 64
    num_values: int = 64
    num_filler: int = 64
    min_distance: int = 1     # random layout: smallest value-to-query distance
    random_fraction: float = 0.0  # blocked layout: share of training sequences in the random layout

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"recall.layout: expected one of {', '.join(map(repr, LAYOUTS))}, received "
                             f"{self.layout!r}")
        for name in ("pairs", "num_keys", "num_values", "num_filler", "min_distance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"recall.{name}: expected a positive int, received {value!r}")
        if not (isinstance(self.random_fraction, (int, float)) and 0.0 <= self.random_fraction <= 1.0):
            raise ValueError(f"recall.random_fraction: expected a number in [0, 1], received "
                             f"{self.random_fraction!r}")
        if self.random_fraction and self.layout != "blocked":
            raise ValueError(f"recall.random_fraction: expected 0 with layout {self.layout!r} (it mixes random "
                             f"sequences into a blocked task), received {self.random_fraction}")
        if self.pairs > self.num_keys:
            raise ValueError(f"recall.pairs: expected at most num_keys={self.num_keys} (keys are distinct), "
                             f"received {self.pairs}")

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_keys + self.num_values + self.num_filler

    def check_length(self, seq_len: int, name: str = "seq_len") -> None:
        """A sequence of ``seq_len`` inputs (``seq_len + 1`` tokens) must hold the pairs and the queries; placed
        at random, they may fill at most half of it."""
        random = self.layout == "random" or self.random_fraction
        need = (8 if random else 4) * self.pairs - 1
        if seq_len < need:
            raise ValueError(f"{name}: expected at least {'8' if random else '4'} * recall.pairs - 1 = {need} "
                             f"tokens for {self.pairs} pairs and their queries"
                             + (" placed at random" if random else "") + f", received {seq_len}")
        if (self.layout == "random" or self.random_fraction) and self.min_distance > seq_len - 2:
            raise ValueError(f"recall.min_distance: expected at most seq_len - 2 = {seq_len - 2}, received "
                             f"{self.min_distance}")


class RecallVocabulary:
    """Names the task's token ids for people (``k3``, ``v17``, ``f5``, ``<eot>``); ``encode`` reads them back.
    Stands in for a tokenizer where the applications need one."""

    def __init__(self, spec: RecallSpec):
        self.spec = spec
        self.vocab_size = spec.vocab_size
        self.eos_id = 0

    def _name(self, token: int) -> str:
        s = self.spec
        if token == 0:
            return "<eot>"
        for prefix, first, count in (("k", 1, s.num_keys), ("v", 1 + s.num_keys, s.num_values),
                                     ("f", 1 + s.num_keys + s.num_values, s.num_filler)):
            if first <= token < first + count:
                return f"{prefix}{token - first}"
        raise ValueError(f"token: expected an id in [0, {self.vocab_size}), received {token}")

    def decode(self, ids) -> str:
        return " ".join(self._name(int(t)) for t in ids)

    def encode(self, text: str) -> np.ndarray:
        s = self.spec
        firsts = {"k": (1, s.num_keys), "v": (1 + s.num_keys, s.num_values),
                  "f": (1 + s.num_keys + s.num_values, s.num_filler)}
        ids = []
        for word in text.split():
            if word == "<eot>":
                ids.append(0)
                continue
            first, count = firsts.get(word[:1], (None, 0))
            if first is None or not word[1:].isdigit() or int(word[1:]) >= count:
                raise ValueError(f"prompt: expected words k0..k{s.num_keys - 1}, v0..v{s.num_values - 1}, "
                                 f"f0..f{s.num_filler - 1} or <eot>, received {word!r}")
            ids.append(first + int(word[1:]))
        return np.asarray(ids, np.int32)


def _log_uniform(rng, low: int, high: int) -> int:
    return int(min(high, math.floor(math.exp(rng.uniform(math.log(low), math.log(high + 1))))))


class AssociativeRecall:
    """Random-access recall examples (a grain data source) of ``seq_len`` inputs.

    Fields ``[seq_len]``: ``inputs``, ``targets`` int32, ``loss_mask`` float32 (1 on answers),
    ``segment_ids`` (all 1), ``positions`` (0..seq_len-1), ``answer_source`` int32 (see the module).
    ``split`` (``"train"`` or ``"validation"``) draws from its own random stream.
    """

    def __init__(self, spec: RecallSpec, seq_len: int, *, seed: int, split: str = "train",
                 num_examples: int = 2**20):
        spec.check_length(seq_len)
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(map(repr, SPLITS))}, received {split!r}")
        self.spec, self.seq_len, self.num_examples = spec, seq_len, num_examples
        self.stream = (seed, SPLITS.index(split))
        self.random_fraction = spec.random_fraction if split == "train" else 0.0

    def __len__(self) -> int:
        return self.num_examples

    def _slots(self, rng, layout: str) -> list[tuple[int, int]]:
        """(pair start, query start) per pair, in stream positions; the pair's value is at pair start + 1."""
        s, n = self.spec, self.seq_len + 1
        if layout == "blocked":
            order = rng.permutation(s.pairs)
            return [(2 * p, n - 2 * s.pairs + 2 * int(order[p])) for p in range(s.pairs)]
        free = np.ones(n, bool)
        slots = []
        for _ in range(s.pairs):
            for _attempt in range(1000):
                distance = _log_uniform(rng, s.min_distance, self.seq_len - 2)  # value -> query key
                query = int(rng.integers(distance + 1, self.seq_len))  # the query key's input position
                pair = query - distance - 1
                if pair >= 0 and free[[pair, pair + 1, query, query + 1]].all():
                    break
            else:
                raise ValueError(f"recall.pairs: could not place {s.pairs} pairs in {self.seq_len} tokens; "
                                 "use fewer pairs or longer sequences")
            free[[pair, pair + 1, query, query + 1]] = False
            slots.append((pair, query))
        return slots

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        s, n = self.spec, self.seq_len + 1
        rng = np.random.default_rng([*self.stream, int(index)])
        layout = "random" if self.random_fraction and rng.uniform() < self.random_fraction else s.layout
        first_value, first_filler = 1 + s.num_keys, 1 + s.num_keys + s.num_values
        stream = (first_filler + rng.integers(0, s.num_filler, n)).astype(np.int32)
        keys = 1 + rng.choice(s.num_keys, s.pairs, replace=False)
        values = first_value + rng.integers(0, s.num_values, s.pairs)
        source = np.full(self.seq_len, -1, np.int32)
        for key, value, (pair, query) in zip(keys, values, self._slots(rng, layout)):
            stream[[pair, query]] = key
            stream[[pair + 1, query + 1]] = value
            source[query] = pair + 1  # input `query` predicts the value, which sits at input `pair + 1`
        return {"inputs": stream[:-1], "targets": stream[1:], "loss_mask": (source >= 0).astype(np.float32),
                "segment_ids": np.ones(self.seq_len, np.int32),
                "positions": np.arange(self.seq_len, dtype=np.int32), "answer_source": source}
