"""Byte-level BPE tokenizer (HF ``tokenizers``), trained offline on the training split or loaded from a file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


class Tokenizer:
    """A byte-level BPE: exact round trip of any UTF-8 text; ``eos_id`` separates documents."""

    def __init__(self, hf_tokenizer: HFTokenizer):
        self._tokenizer = hf_tokenizer
        eos = hf_tokenizer.token_to_id(END_OF_TEXT)
        if eos is None:
            raise ValueError(f"tokenizer: expected the special token {END_OF_TEXT!r} in the vocabulary, "
                             "received a vocabulary without it")
        self.eos_id = eos

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int) -> "Tokenizer":
        """Trains a byte-level BPE of ``vocab_size`` tokens on ``texts`` (deterministic for the same texts)."""
        if vocab_size < 257:
            raise ValueError(f"vocab_size: expected at least 257 (256 bytes + {END_OF_TEXT}), received {vocab_size}")
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer: expected a tokenizer.json file, received {str(path)!r} (not found)")
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tokenizer.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
