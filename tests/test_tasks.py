"""Synthetic long-range tasks (associative recall, passkeys in text), their evaluation and the selection
diagnosis."""

from dataclasses import replace

import jax.numpy as jnp
import numpy as np
import pytest

import sparsek_jax as sk
from builders import random_scores, random_segments, write_text_corpus
from sparsek_jax import data
from sparsek_jax.data.passkey import MixedExamples, PasskeyExamples, PasskeySpec
from sparsek_jax.data.recall import AssociativeRecall, RecallSpec, RecallVocabulary
from sparsek_jax.diagnostics import KEY_STATUS, key_status
from sparsek_train import tasks
from sparsek_train.config import RunConfig

FIELDS = {"inputs", "targets", "loss_mask", "segment_ids", "positions", "answer_source"}


@pytest.mark.parametrize("layout", ["blocked", "random"])
def test_recall_answers_copy_their_source_and_nothing_else_tells_them(layout):
    spec = RecallSpec(layout=layout, pairs=6, num_keys=10, num_values=7, num_filler=5)
    examples = AssociativeRecall(spec, 61, seed=3)
    first_value, first_filler = 1 + spec.num_keys, 1 + spec.num_keys + spec.num_values
    for index in range(40):
        ex = examples[index]
        assert set(ex) == FIELDS and all(len(v) == 61 for v in ex.values())
        stream = np.concatenate([ex["inputs"], ex["targets"][-1:]])
        source = ex["answer_source"]
        asked = np.flatnonzero(source >= 0)
        assert len(asked) == spec.pairs and (ex["loss_mask"] == (source >= 0)).all()
        # Each answer is the value after the earlier occurrence of the same key, further back than the key.
        assert (ex["targets"][asked] == ex["inputs"][source[asked]]).all()
        assert (ex["inputs"][asked] == ex["inputs"][source[asked] - 1]).all()
        assert ((first_value <= ex["targets"][asked]) & (ex["targets"][asked] < first_filler)).all()
        keys = stream[(stream >= 1) & (stream < first_value)]
        assert sorted(np.unique(keys, return_counts=True)[1]) == [2] * spec.pairs  # each key: pair and query
        assert (source[asked] < asked).all()
        if layout == "blocked":  # pairs first, queries last
            assert sorted(source[asked]) == list(range(1, 2 * spec.pairs, 2))
            assert asked.min() >= 62 - 2 * spec.pairs - 1
    again = AssociativeRecall(spec, 61, seed=3)[7]
    assert all((again[k] == examples[7][k]).all() for k in FIELDS)
    other = AssociativeRecall(spec, 61, seed=3, split="validation")[7]
    assert not (other["inputs"] == examples[7]["inputs"]).all()


def test_random_layout_spreads_distances_log_uniformly():
    examples = AssociativeRecall(RecallSpec(layout="random", pairs=4), 512, seed=0)
    distances = np.concatenate([np.flatnonzero(ex["answer_source"] >= 0) - ex["answer_source"][ex["answer_source"] >= 0]
                                for ex in (examples[i] for i in range(300))])
    counts = np.histogram(np.log2(distances), bins=[0, 3, 6, 9])[0]
    assert distances.min() >= 1 and distances.max() <= 510
    assert counts.min() > 0.5 * counts.max(), counts  # about as many short as long ones


def test_random_fraction_mixes_layouts_into_training_only():
    spec = RecallSpec(layout="blocked", pairs=4, random_fraction=0.5)
    blocked = lambda ex: sorted(ex["answer_source"][ex["answer_source"] >= 0]) == [1, 3, 5, 7]
    train = [blocked(AssociativeRecall(spec, 64, seed=0)[i]) for i in range(200)]
    assert 0.35 < np.mean(train) < 0.65
    assert all(blocked(AssociativeRecall(spec, 64, seed=0, split="validation")[i]) for i in range(50))
    with pytest.raises(ValueError, match="recall.random_fraction: expected 0 with layout 'random'"):
        RecallSpec(layout="random", random_fraction=0.5)


def test_recall_spec_and_vocabulary_errors_name_the_setting():
    with pytest.raises(ValueError, match="recall.layout: expected one of 'blocked', 'random', received 'x'"):
        RecallSpec(layout="x")
    with pytest.raises(ValueError, match="recall.pairs: expected at most num_keys=4"):
        RecallSpec(pairs=5, num_keys=4)
    with pytest.raises(ValueError, match="seq_len: expected at least 4 \\* recall.pairs - 1 = 31"):
        AssociativeRecall(RecallSpec(pairs=8), 30, seed=0)
    with pytest.raises(ValueError, match="seq_len: expected at least 8 \\* recall.pairs - 1 = 63 .* at random"):
        AssociativeRecall(RecallSpec(pairs=8, layout="random"), 62, seed=0)
    vocabulary = RecallVocabulary(RecallSpec(pairs=2, num_keys=3, num_values=2, num_filler=2))
    assert vocabulary.vocab_size == 8
    assert vocabulary.decode(vocabulary.encode("k2 v1 f0 <eot>")) == "k2 v1 f0 <eot>"
    with pytest.raises(ValueError, match="prompt: expected words k0..k2"):
        vocabulary.encode("k3")


@pytest.fixture(scope="module")
def text_split(tmp_path_factory):
    root = write_text_corpus(tmp_path_factory.mktemp("texts"), 12, 400)
    prepared = data.prepare_data(dataset="text_files", data_dir=str(tmp_path_factory.mktemp("data")),
                                 source_path=str(root), vocab_size=300, log=lambda m: None)
    return prepared


def test_passkey_is_hidden_at_its_depth_and_asked_for_at_the_end(text_split):
    split, tokenizer = text_split.splits["train"], text_split.tokenizer
    examples = PasskeyExamples(split, tokenizer, 160, spec=PasskeySpec(digits=5), seed=1, num_examples=20,
                               stratified=True)
    depths = []
    for index in range(20):
        ex = examples[index]
        assert set(ex) == FIELDS and (ex["loss_mask"] == 1).all()
        source = ex["answer_source"]
        asked = np.flatnonzero(source >= 0)
        assert asked[-1] == 159 and (np.diff(asked) == 1).all()  # the number's tokens, last in the sequence
        assert (ex["targets"][asked] == ex["inputs"][source[asked]]).all()
        text = tokenizer.decode(np.concatenate([ex["inputs"], ex["targets"][-1:]]))
        number = tokenizer.decode(ex["targets"][asked]).strip()
        assert len(number) == 5 and number.isdigit()
        assert f"The pass key is {number}. Remember it. {number} is the pass key." in text
        assert text.endswith(f"What is the pass key? The pass key is {number}")
        depths.append(source[asked[0]] / 160)
    assert np.all(np.diff(depths) > 0) and depths[0] < 0.1 and depths[-1] > 0.5  # stratified, start to end
    with pytest.raises(ValueError, match="seq_len: expected a document of at least"):
        PasskeyExamples(split, tokenizer, 10**6, spec=PasskeySpec(), seed=0)


def test_answer_weight_weighs_the_answer_in_training_only(text_split):
    split, tokenizer = text_split.splits["train"], text_split.tokenizer
    weighted = PasskeyExamples(split, tokenizer, 128, spec=PasskeySpec(answer_weight=8.0), seed=0)[3]
    asked = weighted["answer_source"] >= 0
    assert asked.sum() >= 5 and (weighted["loss_mask"][asked] == 8).all() and (weighted["loss_mask"][~asked] == 1).all()
    plain = PasskeyExamples(split, tokenizer, 128, spec=PasskeySpec(), seed=0)[3]
    assert all((weighted[k] == plain[k]).all() for k in FIELDS - {"loss_mask"})
    default = RunConfig()
    config = replace(default, data=replace(default.data, passkey=PasskeySpec(fraction=0.5, answer_weight=8.0)))
    (held_out,) = [s for s in tasks.evaluation_sets(config, text_split, 128) if s.name == "passkey"]
    assert (held_out.examples[0]["loss_mask"] == 1).all()  # held-out loss: every token once
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match=f"passkey.answer_weight: expected a finite number > 0, received {bad!r}"):
            PasskeySpec(answer_weight=bad)


def test_mixing_is_deterministic_and_keeps_the_fraction(text_split):
    split, tokenizer = text_split.splits["train"], text_split.tokenizer
    packed = data.PackedSequences(split, 128)
    passkeys = PasskeyExamples(split, tokenizer, 128, spec=PasskeySpec(fraction=0.3), seed=0, num_examples=len(packed))
    mixed = MixedExamples(packed, passkeys, fraction=0.3, seed=0)
    chosen = [bool((mixed[i]["answer_source"] >= 0).any()) for i in range(len(mixed))]
    assert abs(np.mean(chosen) - 0.3) < 0.15 and len(mixed) == len(packed)
    assert chosen == [bool((mixed[i]["answer_source"] >= 0).any()) for i in range(len(mixed))]
    assert all(set(mixed[i]) == FIELDS for i in range(5))


@pytest.mark.parametrize("segmented", [False, True])
def test_key_status_agrees_with_the_dense_pattern(rng, segmented):
    batch, seq, heads, topk, window = 2, 40, 2, 5, 4
    scores = random_scores(rng, batch, seq, heads, scale=0.6, slope=0.02)
    segments = random_segments(rng, batch, seq) if segmented else None
    sources = np.full((batch, seq), -1, np.int32)
    for b in range(batch):
        for i in range(seq):
            if rng.uniform() < 0.7:
                sources[b, i] = rng.integers(0, i + 1)
    status = np.asarray(key_status(scores, jnp.asarray(sources), topk=topk, window=window, segment_ids=segments))
    pattern = sk.attention_pattern(scores, topk=topk, window=window, segment_ids=segments)
    window_mask, selected, gates = (np.asarray(x) for x in pattern)
    for b in range(batch):
        for i in range(seq):
            j = sources[b, i]
            for h in range(heads):
                if j < 0:
                    want = -1
                elif window_mask[b, h, i, j]:
                    want = KEY_STATUS.index("window")
                elif selected[b, h, i, j] and gates[b, h, i, j] >= 1:
                    want = KEY_STATUS.index("gate_one")
                elif selected[b, h, i, j] and gates[b, h, i, j] > 0:
                    want = KEY_STATUS.index("fractional")
                else:
                    want = KEY_STATUS.index("not_attended")
                assert status[b, i, h] == want, (b, i, j, h)
    assert set(np.unique(status)) >= {-1, 0, 1, 3}


def test_answer_accounting_by_distance_depth_and_status():
    from sparsek_train.evaluate import _Answers

    answers = _Answers(64, layers=[1])
    source = np.full((2, 64), -1, np.int32)
    source[0, [40, 50]] = [3, 30]      # distances 37 (32-64) and 20 (16-32); sequence 0's depth: 3/64 -> 0.0-0.1
    source[1, 60] = 40                 # distance 20; depth 40/64 -> 0.6-0.7
    mask = np.ones((2, 64), np.float32)
    mask[1] = 0                        # a padding row: no answers count
    correct = np.zeros((2, 64), bool)
    correct[0, 40] = True
    status = np.full((1, 2, 64, 2), -1, np.int32)
    status[0, 0, 40] = [3, 1]          # best head: gate one
    status[0, 0, 50] = [2, 3]          # best head: fractional
    answers.add({"answer_source": source, "loss_mask": mask}, correct, status)
    mask[1] = 1
    source[0] = -1
    status[0, 1, 60] = [0, 3]
    answers.add({"answer_source": source, "loss_mask": mask}, correct, status)
    report = answers.report()
    assert report["answers"] == 3 and report["accuracy"] == pytest.approx(1 / 3)
    assert report["sequences"] == 2 and report["sequence_accuracy"] == 0.0
    assert {b["distance"]: (b["answers"], b["accuracy"]) for b in report["by_distance"]} == {
        "16-32": (2, 0.0), "32-64": (1, 1.0)}
    assert {b["depth"]: (b["sequences"], b["answers"]) for b in report["by_depth"]} == {
        "0.0-0.1": (1, 2), "0.6-0.7": (1, 1)}
    selection = report["selection"][0]
    assert selection["layer"] == 1
    assert selection["best_head"] == pytest.approx({"window": 1 / 3, "gate_one": 1 / 3, "fractional": 1 / 3,
                                                   "not_attended": 0.0})
    assert selection["per_head"] == pytest.approx({"window": 1 / 6, "gate_one": 1 / 6, "fractional": 1 / 6,
                                                  "not_attended": 1 / 2})
    by_distance = {b["distance"]: b for b in selection["best_head_by_distance"]}
    assert by_distance["16-32"]["fractional"] == 0.5 and by_distance["32-64"]["gate_one"] == 1.0
    assert _Answers(64, layers=[]).report() is None
