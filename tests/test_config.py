from pathlib import Path

import pytest

from sparsek_train.config import ConfigError, DataConfig, RunConfig, dump_config, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert load_config_from_text(dump_config(config), path.parent) == config


def load_config_from_text(text, directory):
    resolved = directory / ".resolved-test.yaml"
    try:
        resolved.write_text(text)
        return load_config(resolved)
    finally:
        resolved.unlink()


def test_overrides_and_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  seq_len: 128\n  vocab_size: 512\n")
    (tmp_path / "run.yaml").write_text("base_config: base.yaml\ndata:\n  vocab_size: 1024\n")
    config = load_config(tmp_path / "run.yaml", ["data.batch_size=3", "data.tokenizer=null", "data.dataset=pg19"])
    assert config.data == DataConfig(seq_len=128, vocab_size=1024, batch_size=3, dataset="pg19")


@pytest.mark.parametrize("overrides, match", [
    (["data.seq_lenn=3"], r"data.seq_lenn: unknown key \(known keys: batch_size,"),
    (["data.seq_len=abc"], "data.seq_len: expected int, received 'abc'"),
    (["data.seq_len=1.5"], "data.seq_len: expected int, received 1.5"),
    (["modle.topk=3"], "modle: unknown key"),
    (["model=3"], "model: expected a mapping, received 3"),
    (["model.num_heads=5", "model.num_kv_heads=2"], "model.num_heads: expected a multiple of num_kv_heads=2"),
    (["model.attention=flash"], "model.attention: expected one of 'dense', 'sliding', 'sparsek'"),
    (["train.accumulate=3"], r"train.accumulate: expected a divisor of data.batch_size=8"),
    (["train.mesh.pipeline=2"], "train.mesh.pipeline: unknown key"),
    (["data.seq_len"], "override 'data.seq_len': expected key.sub=value"),
    # Numeric ranges: values that would train on NaN or do gradient ascent with exit code 0.
    (["train.learning_rate=.inf"], r"train.learning_rate: expected a finite number > 0.0, received inf"),
    (["train.learning_rate=.nan"], r"train.learning_rate: expected a finite number > 0.0, received nan"),
    (["train.grad_clip=-1"], r"train.grad_clip: expected a finite number > 0.0, received -1.0"),
    (["train.warmup_steps=-5"], r"train.warmup_steps: expected a finite number >= 0, received -5"),
    (["train.beta2=1.0"], r"train.beta2: expected a finite number >= 0.0 and < 1.0, received 1.0"),
    (["train.on_nonfinite=ignore"], "train.on_nonfinite: expected 'stop' or 'skip', received 'ignore'"),
    (["model.rope_base=0"], r"model.rope_base: expected a finite number > 0, received 0"),
    (["model.norm_eps=-1"], r"model.norm_eps: expected a finite number > 0, received -1"),
    (["model.head_dim=7"], r"model.head_dim: expected an even number \(RoPE rotates pairs\), received 7"),
    (["model.buffer_size=8", "model.topk=16"], "model.buffer_size: expected None or at least topk=16, received 8"),
    (["eval.lengths=[0]"], r"eval.lengths\[0\]: expected a finite number >= 1, received 0"),
    (["eval.batch_size=0"], "eval.batch_size: expected a finite number >= 1, received 0"),
    (["generate.top_p=2"], r"generate.top_p: expected a value in \(0, 1\], received 2.0"),
    (["generate.temperature=-1"], "generate.temperature: expected a finite number >= 0, received -1.0"),
    (["data.vocab_size=1"], "data.vocab_size: expected a finite number >= 2, received 1"),
])
def test_bad_values_name_the_key(tmp_path, overrides, match):
    (tmp_path / "run.yaml").write_text("data:\n  seq_len: 64\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "run.yaml", overrides)


def test_missing_file_and_cycles(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("base_config: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base_config: a.yaml\n")
    with pytest.raises(ConfigError, match="base_config: cycle"):
        load_config(tmp_path / "a.yaml")


def test_exponent_floats_without_a_dot(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; float fields take it as the number it is.
    (tmp_path / "run.yaml").write_text("train:\n  learning_rate: 3e-4\n")
    assert load_config(tmp_path / "run.yaml").train.learning_rate == 3e-4
    assert load_config(tmp_path / "run.yaml", ["train.weight_decay=1E+1"]).train.weight_decay == 10.0
    with pytest.raises(ConfigError, match="train.steps: expected int, received '1e3'"):
        load_config(tmp_path / "run.yaml", ["train.steps=1e3"])


def test_model_vocab_must_cover_the_tokenizer(tmp_path):
    (tmp_path / "run.yaml").write_text("model:\n  vocab_size: 100\n")
    config = load_config(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match="model.vocab_size: expected at least the tokenizer's 2048 tokens, "
                                          "received 100"):
        config.model_config(vocab_size=2048)
    assert config.model_config(vocab_size=64).vocab_size == 100


def test_training_needs_model_and_train_sections(tmp_path, capsys):
    from sparsek_train import trainer

    (tmp_path / "run.yaml").write_text("data:\n  seq_len: 64\n")
    assert trainer.main([str(tmp_path / "run.yaml")]) == 2
    assert "model: section missing from" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train: section missing"):
        load_config(tmp_path / "run.yaml", ["model.topk=4"], require=("model", "train"))
