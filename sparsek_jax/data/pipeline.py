"""Input pipeline: TFDS data source -> tokenize once and cache to disk -> pack -> grain -> global arrays.

- ``tokenize_split`` reads a split with ``tfds.data_source`` and writes its token ids once
  (``tokens.npy``, document ``offsets.npy``, UTF-8 ``bytes.npy`` per document, ``meta.json``; written to a
  temporary name and renamed, so a crash never leaves a half-written cache). Later runs memory-map them.
- ``PackedSequences``: training examples by concatenate-then-split. Documents are joined with an
  end-of-text token and the stream is cut into ``seq_len + 1`` windows; ``segment_ids`` mark the documents
  inside a window and ``positions`` restart at each document, so attention never crosses a boundary.
- ``DocumentWindows``: evaluation examples, per document: consecutive windows of ``seq_len`` targets, padded
  at the end of a document (``loss_mask``), with the position of every target inside its window.
- ``training_batches``: a grain pipeline over ``PackedSequences``, shuffled from a seed, each process reading
  its own share of every global batch; its iterator state is checkpointable (``get_state``/``set_state``).
- ``global_batch``: a process's local batch -> global ``jax.Array`` s with the data sharding.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grain
import jax
import numpy as np

from sparsek_jax.data.tokenizer import Tokenizer

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TokenizedSplit:
    """A split's documents as one flat array of token ids. ``offsets[d]:offsets[d + 1]`` is document ``d``."""

    tokens: np.ndarray     # int32-compatible [num_tokens]
    offsets: np.ndarray    # int64 [num_docs + 1]
    num_bytes: np.ndarray  # int64 [num_docs], UTF-8 bytes of each document
    eos_id: int

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def bytes_per_token(self) -> float:
        return float(self.num_bytes.sum()) / max(self.num_tokens, 1)

    def document(self, d: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[d]:self.offsets[d + 1]])


def _atomic_save(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        np.save(f, array)
    os.replace(temporary, path)


def tokenize_split(documents, tokenizer: Tokenizer, cache_dir: str | Path, *, fingerprint: str,
                   chunk_size: int = 64, log=print) -> TokenizedSplit:
    """Tokenizes a random-access sequence of ``{"text": bytes | str}`` documents once and caches the result
    in ``cache_dir``; returns the memory-mapped cache. ``fingerprint`` names the tokenizer: a different one
    invalidates the cache."""
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint and meta.get("format") == FORMAT_VERSION:
            return TokenizedSplit(np.load(cache_dir / "tokens.npy", mmap_mode="r"),
                                  np.load(cache_dir / "offsets.npy"), np.load(cache_dir / "bytes.npy"),
                                  meta["eos_id"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    pieces, lengths, num_bytes = [], [], []
    total = len(documents)
    start = time.perf_counter()
    for first in range(0, total, chunk_size):
        texts = []
        for index in range(first, min(first + chunk_size, total)):
            text = documents[index]["text"]
            texts.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        for text, ids in zip(texts, tokenizer.encode_batch(texts)):
            pieces.append(ids)
            lengths.append(len(ids))
            num_bytes.append(len(text.encode("utf-8")))
        done = min(first + chunk_size, total)
        rate = sum(lengths) / max(time.perf_counter() - start, 1e-9)
        log(f"  tokenized {done}/{total} documents, {sum(lengths):,} tokens ({rate:,.0f} tokens/s)")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    tokens = np.concatenate(pieces).astype(dtype) if pieces else np.zeros((0,), dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    _atomic_save(cache_dir / "tokens.npy", tokens)
    _atomic_save(cache_dir / "offsets.npy", offsets)
    _atomic_save(cache_dir / "bytes.npy", np.asarray(num_bytes, np.int64))
    meta = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "eos_id": tokenizer.eos_id,
            "num_docs": len(lengths), "num_tokens": int(offsets[-1])}
    temporary = meta_path.with_name("meta.json.tmp")
    temporary.write_text(json.dumps(meta, indent=2))
    os.replace(temporary, meta_path)  # written last: its presence marks a complete cache
    return TokenizedSplit(np.load(cache_dir / "tokens.npy", mmap_mode="r"), offsets,
                          np.asarray(num_bytes, np.int64), tokenizer.eos_id)


class PackedSequences:
    """Training examples by concatenate-then-split (random access, a grain data source).

    Example ``i`` covers stream positions ``[i L, i L + L]``: ``inputs`` and ``targets`` ``[L]`` int32,
    ``segment_ids`` ``[L]`` (1, 2, ... for the documents inside the window), ``positions`` ``[L]`` (position
    inside each document; they restart at every document start), ``loss_mask`` (all 1) and ``answer_source``
    (all -1: no answers, see ``sparsek_jax.data.recall``), the fields every training source yields.
    """

    def __init__(self, split: TokenizedSplit, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len: expected a positive int, received {seq_len}")
        lengths = split.doc_lengths + 1  # each document followed by end-of-text
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        stream = np.empty(int(self.doc_starts[-1]), np.int32)
        for d in range(split.num_docs):
            start = self.doc_starts[d]
            stream[start:start + lengths[d] - 1] = split.document(d)
            stream[start + lengths[d] - 1] = split.eos_id
        self.stream = stream
        self.seq_len = seq_len
        if len(self) == 0:
            raise ValueError(f"seq_len: the split has {len(stream)} tokens, fewer than seq_len + 1 = {seq_len + 1}")

    def __len__(self) -> int:
        return max((len(self.stream) - 1) // self.seq_len, 0)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = int(index) * self.seq_len
        window = self.stream[start:start + self.seq_len + 1]
        where = np.arange(start, start + self.seq_len)
        doc = np.searchsorted(self.doc_starts, where, side="right") - 1
        return {"inputs": window[:-1], "targets": window[1:],
                "segment_ids": (doc - doc[0] + 1).astype(np.int32),
                "positions": (where - self.doc_starts[doc]).astype(np.int32),
                "loss_mask": np.ones(self.seq_len, np.float32), "answer_source": np.full(self.seq_len, -1, np.int32)}


class DocumentWindows:
    """Evaluation examples: each document in consecutive windows of ``seq_len`` predicted tokens.

    Fields ``[L]``: ``inputs``, ``targets``, ``loss_mask`` (float32, 0 on padding), ``positions`` (position
    inside the window), ``segment_ids`` (1, 0 on padding), ``answer_source`` (all -1); plus scalars ``doc``
    and ``window``.
    """

    def __init__(self, split: TokenizedSplit, seq_len: int, *, max_windows_per_doc: int | None = None):
        self.split, self.seq_len = split, seq_len
        index = []
        for d, length in enumerate(split.doc_lengths):
            windows = -(-(int(length) - 1) // seq_len) if length > 1 else 0
            if max_windows_per_doc is not None:
                windows = min(windows, max_windows_per_doc)
            index.extend((d, w) for w in range(windows))
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d, w = self.index[int(i)]
        doc = self.split.document(d)
        piece = doc[w * self.seq_len: (w + 1) * self.seq_len + 1].astype(np.int32)
        valid = len(piece) - 1
        pad = self.seq_len - valid
        inputs = np.pad(piece[:-1], (0, pad))
        targets = np.pad(piece[1:], (0, pad))
        mask = np.pad(np.ones(valid, np.float32), (0, pad))
        return {"inputs": inputs, "targets": targets, "loss_mask": mask, "segment_ids": mask.astype(np.int32),
                "positions": np.arange(self.seq_len, dtype=np.int32), "answer_source": np.full(self.seq_len, -1, np.int32),
                "doc": np.int32(d), "window": np.int32(w)}


def training_batches(source: PackedSequences, *, global_batch_size: int, seed: int, num_epochs: int = 1000,
                     process_index: int | None = None, process_count: int | None = None):
    """A grain dataset of this process's share of every global batch, shuffled from ``seed``.

    The global order is one seeded permutation of ``num_epochs`` passes over the examples; process ``p`` of
    ``P`` takes every ``P``-th example of it, so the processes together read each global batch exactly once.
    ``iter(dataset)`` gives an iterator whose ``get_state()`` / ``set_state()`` resume it exactly.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"data.batch_size: expected a multiple of the process count {process_count}, "
                         f"received {global_batch_size}")
    dataset = grain.MapDataset.source(source).repeat(num_epochs).shuffle(seed=seed)
    dataset = dataset[process_index::process_count]
    return dataset.batch(global_batch_size // process_count, drop_remainder=True).to_iter_dataset()


def evaluation_batches(source: DocumentWindows, *, global_batch_size: int, process_index: int | None = None,
                       process_count: int | None = None):
    """Evaluation windows in order (the last batch padded with empty windows), this process's share."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local = global_batch_size // process_count
    total = -(-len(source) // global_batch_size) * global_batch_size

    def example(i):
        if i < len(source):
            return source[i]
        empty = {k: np.zeros_like(v) for k, v in source[0].items()}  # no loss, no answers
        if "answer_source" in empty:
            empty["answer_source"] -= 1
        return empty

    dataset = grain.MapDataset.range(total).map(example)[process_index::process_count]
    return dataset.batch(local, drop_remainder=True)


def global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Assembles every process's local batch into global arrays laid out by ``sharding``."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
