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
