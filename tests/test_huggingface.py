"""Hugging Face checkpoints: logits against the `transformers` reference (golden fixtures made by
tests/fixtures/huggingface/make_fixtures.py), export -> import round trips, conversion to other attention
kinds, and the errors for checkpoints that do not fit."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from sparsek_jax.nn import TransformerLM
from sparsek_jax.nn import huggingface as hf
from sparsek_jax.nn.config import ModelConfig

FIXTURES = Path(__file__).parent / "fixtures" / "huggingface"
TOKENS = np.load(FIXTURES / "tokens.npy")
ARCHITECTURES = ("llama", "qwen2", "mistral")


def logits_of(model, tokens=TOKENS):
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logits_match_the_reference_implementation(name):
    model = hf.from_pretrained(FIXTURES / name)
    expected = np.load(FIXTURES / name / "logits.npy")
    np.testing.assert_allclose(logits_of(model), expected, atol=2e-4, rtol=1e-4)


def test_what_each_config_maps_to():
    llama = hf.model_config_from_pretrained(FIXTURES / "llama")
    assert (llama.head_dim, llama.num_kv_heads, llama.tie_embeddings, llama.qkv_bias) == (16, 2, False, False)
    assert llama.rope_scaling == hf.RopeScaling("llama3", 8.0, 1.0, 4.0, 64) and llama.rope_base == 500_000.0
    qwen = hf.model_config_from_pretrained(FIXTURES / "qwen2")
    assert (qwen.qkv_bias, qwen.out_bias, qwen.tie_embeddings, qwen.layer_kinds) == (True, False, True,
                                                                                    ("dense", "dense"))
    mistral = hf.model_config_from_pretrained(FIXTURES / "mistral")
    assert mistral.layer_kinds == ("sliding", "sliding") and mistral.window == 8
    assert mistral.rope_scaling.kind == "linear" and not mistral.scale_embeddings


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_export_import_round_trip(name, tmp_path):
    model = hf.from_pretrained(FIXTURES / name)
    hf.save_pretrained(model, tmp_path / "out")
    again = hf.from_pretrained(tmp_path / "out")
    assert again.config == model.config
    np.testing.assert_array_equal(logits_of(again), logits_of(model))
    with safe_open(str(FIXTURES / name / "model.safetensors"), "flax") as original, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "flax") as exported:
        assert sorted(exported.keys()) == sorted(original.keys())
        for key in original.keys():
            np.testing.assert_array_equal(np.asarray(exported.get_tensor(key)), np.asarray(original.get_tensor(key)),
                                          err_msg=key)


def test_native_models_export_with_their_embedding_scale_folded(tmp_path):
    config = ModelConfig(vocab_size=50, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                         mlp_dim=24, attention="dense")  # scale_embeddings and tied, as models built here
    model = TransformerLM(config, rngs=nnx.Rngs(3))
    hf.save_pretrained(model, tmp_path / "out")
    again = hf.from_pretrained(tmp_path / "out")
    assert not again.config.tie_embeddings and not again.config.scale_embeddings
    tokens = np.arange(20, dtype=np.int32).reshape(2, 10)
    np.testing.assert_allclose(logits_of(again, tokens), logits_of(model, tokens), atol=1e-5)


def test_scan_layers_and_sharded_parameters_load_the_same():
    plain = hf.from_pretrained(FIXTURES / "llama")
    scanned = hf.from_pretrained(FIXTURES / "llama", scan_layers=True)
    np.testing.assert_allclose(logits_of(scanned), logits_of(plain), atol=1e-5)
    # Each parameter keeps the sharding it was created with.
    model = TransformerLM(hf.model_config_from_pretrained(FIXTURES / "llama"), rngs=nnx.Rngs(0))
    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    model.embed.set_value(jax.device_put(model.embed[...], sharding))
    hf.load_pretrained_weights(model, FIXTURES / "llama")
    assert model.embed[...].sharding == sharding
    np.testing.assert_array_equal(logits_of(model), logits_of(plain))


def test_any_attention_kind_per_layer():
    dense = hf.from_pretrained(FIXTURES / "qwen2")
    # A window that covers the whole sequence is dense attention, whatever the kind.
    everything = hf.from_pretrained(FIXTURES / "qwen2", attention=("sparsek", "sliding"), window=24, topk=4,
                                    implementation="xla")
    np.testing.assert_allclose(logits_of(everything), logits_of(dense), atol=2e-5)
    assert everything.blocks[0].attention.scorer is not None and everything.blocks[1].attention.scorer is None


def test_converted_layers_start_as_a_wider_sliding_window():
    """With w_score = 0 (as imported) and a position slope of at least 1, the top-k keys before the window are
    the k most recent ones, each with gate 1: a SparseK layer is a sliding window of window + topk keys."""
    converted = hf.from_pretrained(FIXTURES / "llama", attention="sparsek", window=4, topk=3, position_slope=1.0,
                                   implementation="xla")
    sliding = hf.from_pretrained(FIXTURES / "llama", attention="sliding", window=7)
    np.testing.assert_allclose(logits_of(converted), logits_of(sliding), atol=2e-5)


def _copy(name, tmp_path):
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_checkpoints_that_do_not_fit_are_named(tmp_path):
    with pytest.raises(hf.CheckpointFormatError, match=r"model_type: expected one of \('llama', 'mistral', "
                                                       r"'qwen2'\), received 'gpt2'"):
        hf.model_config_from_pretrained({"model_type": "gpt2"})
    with pytest.raises(hf.CheckpointFormatError, match="expected a Hugging Face checkpoint directory with "
                                                       "config.json"):
        hf.from_pretrained(tmp_path)
    with pytest.raises(hf.CheckpointFormatError, match=r"rope_scaling.rope_type: expected one of .* received 'yarn'"):
        hf.model_config_from_pretrained({**json.loads((FIXTURES / "llama" / "config.json").read_text()),
                                         "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    wider = _copy("llama", tmp_path)
    _edit_config(wider, intermediate_size=64)
    with pytest.raises(hf.CheckpointFormatError, match=r"tensor model.layers.0.mlp.gate_proj.weight: expected "
                                                       r"shape \(64, 32\) for the model config, the checkpoint "
                                                       r"holds \(48, 32\)"):
        hf.from_pretrained(wider)
    deeper = _copy("mistral", tmp_path)
    _edit_config(deeper, num_hidden_layers=3)
    with pytest.raises(hf.CheckpointFormatError, match=r"tensor model.layers.2.input_layernorm.weight missing"):
        hf.from_pretrained(deeper)
    biased = _copy("qwen2", tmp_path)
    _edit_config(biased, model_type="llama")
    with pytest.raises(hf.CheckpointFormatError, match=r"tensor model.layers.0.self_attn.k_proj.bias is not used"):
        hf.from_pretrained(biased)
    with pytest.raises(hf.CheckpointFormatError, match="layer 0 is 'sparsek': the Hugging Face layout has no place"):
        hf.save_pretrained(hf.from_pretrained(FIXTURES / "llama", attention="sparsek", topk=2, window=2),
                           tmp_path / "out")


def test_training_app_starts_from_a_pretrained_directory():
    from sparsek_train.config import ConfigError
    from sparsek_train.initial_weights import load_initial_weights

    config = hf.model_config_from_pretrained(FIXTURES / "mistral", attention="sparsek", topk=3, window=4,
                                             implementation="xla")
    model = TransformerLM(config, rngs=nnx.Rngs(1))
    messages = []
    load_initial_weights(model, FIXTURES / "mistral", log=messages.append)
    assert messages and "2 of them now sparsek" in messages[0]
    np.testing.assert_allclose(logits_of(model), logits_of(hf.from_pretrained(
        FIXTURES / "mistral", attention="sparsek", topk=3, window=4, implementation="xla")), atol=1e-6)
    other = TransformerLM(ModelConfig(vocab_size=96, d_model=48, num_layers=2, num_heads=4, num_kv_heads=2,
                                      head_dim=8, mlp_dim=48), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"train.init_from: .* does not fit the model section \(model.d_model: 32 "
                                          r"in the checkpoint, 48 in the config, .*model.scale_embeddings: False in "
                                          r"the checkpoint, True in the config"):
        load_initial_weights(other, FIXTURES / "mistral")
