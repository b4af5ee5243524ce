"""Data: long-document corpora as TFDS builders, a byte-level BPE tokenizer, packing and a grain pipeline."""

from sparsek_jax.data.corpora import BUILTIN_CORPORA, ShakespearePlays, SotuDocuments, TextFiles, builder, prepare
from sparsek_jax.data.pipeline import (DocumentWindows, PackedSequences, TokenizedSplit, evaluation_batches,
                                       global_batch, tokenize_split, training_batches)
from sparsek_jax.data.prepare import PreparedData, prepare_data, statistics
from sparsek_jax.data.tokenizer import END_OF_TEXT, Tokenizer

__all__ = ["BUILTIN_CORPORA", "DocumentWindows", "END_OF_TEXT", "PackedSequences", "PreparedData",
           "ShakespearePlays", "SotuDocuments", "TextFiles", "TokenizedSplit", "Tokenizer", "builder",
           "evaluation_batches", "global_batch", "prepare", "prepare_data", "statistics", "tokenize_split",
           "training_batches"]
