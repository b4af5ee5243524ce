"""Builds a corpus, its tokenizer and its token caches, and reports what it holds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsek_jax.data import corpora
from sparsek_jax.data.pipeline import TokenizedSplit, tokenize_split
from sparsek_jax.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class PreparedData:
    """Everything a run reads: the tokenizer and the tokenized splits (memory-mapped)."""

    tokenizer: Tokenizer
    splits: dict[str, TokenizedSplit]
    directory: Path
    skipped: tuple[str, ...] = ()


def prepare_data(*, dataset: str, data_dir: str, source_path: str | None = None, text_key: str = "text",
                 tokenizer_path: str | None = None, vocab_size: int = 8192,
                 splits: tuple[str, ...] = ("train", "validation"), log=print) -> PreparedData:
    """Builds the TFDS corpus (once), trains a byte-level BPE on its training split (or loads
    ``tokenizer_path``), and tokenizes every split once. Everything lives under ``data_dir``; the tokenizer is
    stored with the dataset, so later runs reuse it."""
    log(f"building corpus {dataset!r} under {data_dir}")
    corpus = corpora.prepare(dataset, data_dir=data_dir, source_path=source_path, text_key=text_key)
    skipped = tuple(getattr(corpus, "skipped", ()))
    if skipped:
        log(f"skipped {len(skipped)} file(s) or line(s) that are not text (invalid UTF-8, NUL bytes): {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else ""))
    sources = {split: corpus.as_data_source(split=split) for split in splits}
    directory = Path(data_dir) / "sparsek" / corpus.name / corpus.builder_config.name \
        if corpus.builder_config else Path(data_dir) / "sparsek" / corpus.name
    if tokenizer_path is not None:
        tokenizer = Tokenizer.load(tokenizer_path)
        log(f"loaded tokenizer {tokenizer_path} ({tokenizer.vocab_size} tokens)")
    else:
        stored = directory / f"tokenizer-{vocab_size}.json"
        if stored.is_file():
            tokenizer = Tokenizer.load(stored)
        else:
            train = sources[splits[0]]
            log(f"training a byte-level BPE of {vocab_size} tokens on {len(train)} {splits[0]} documents")
            texts = (train[i]["text"].decode("utf-8") for i in range(len(train)))
            tokenizer = Tokenizer.train(texts, vocab_size=vocab_size)
            tokenizer.save(stored)
        log(f"tokenizer: {stored}")
    fingerprint = hashlib.sha256(tokenizer._tokenizer.to_str().encode()).hexdigest()[:16]
    tokenized = {}
    for split, source in sources.items():
        tokenized[split] = tokenize_split(source, tokenizer, directory / f"tokens-{fingerprint}" / split,
                                          fingerprint=fingerprint, log=log)
    return PreparedData(tokenizer, tokenized, directory, skipped)


def statistics(split: TokenizedSplit) -> dict:
    """Documents, tokens, the length distribution and how many documents reach 8k and 32k tokens."""
    lengths = split.doc_lengths
    if len(lengths) == 0:
        return {"documents": 0, "tokens": 0}
    p = np.percentile(lengths, [0, 10, 50, 90, 100])
    return {"documents": int(split.num_docs), "tokens": int(split.num_tokens),
            "bytes_per_token": round(split.bytes_per_token, 3),
            "length_min": int(p[0]), "length_p10": int(p[1]), "length_median": int(p[2]),
            "length_p90": int(p[3]), "length_max": int(p[4]),
            "documents_8k_or_more": int((lengths >= 8192).sum()),
            "documents_32k_or_more": int((lengths >= 32768).sum())}
