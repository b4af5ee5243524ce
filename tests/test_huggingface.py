"""Hugging Face checkpoints: logits against the `transformers` reference (golden fixtures made by
tests/fixtures/huggingface/make_fixtures.py), export -> import round trips, conversion to other attention
kinds, and the errors for checkpoints that do not fit."""

import json
import shutil
import subprocess
import sys
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

from builders import cpu_devices_env

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
    # Every parameter as the library's reader builds it (the scorers at their zero start in both).
    expected = _parameters(hf.from_pretrained(FIXTURES / "mistral", attention="sparsek", topk=3, window=4,
                                              implementation="xla"))
    got = _parameters(model)
    assert sorted(got) == sorted(expected) and ("embed",) in got
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))
    other = TransformerLM(ModelConfig(vocab_size=96, d_model=48, num_layers=2, num_heads=4, num_kv_heads=2,
                                      head_dim=8, mlp_dim=48), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"train.init_from: .* does not fit the model section \(model.d_model: 32 "
                                          r"in the checkpoint, 48 in the config, .*model.scale_embeddings: False in "
                                          r"the checkpoint, True in the config"):
        load_initial_weights(other, FIXTURES / "mistral")


# -- streamed import, sharded export, and what is refused ------------------------------------------------------

def _parameters(model) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}


def _tensors(path) -> dict:
    """Every tensor of a checkpoint directory, read with the ``safetensors`` package (the reference reader)."""
    tensors = {}
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), "flax") as f:
            tensors.update({name: np.asarray(f.get_tensor(name)) for name in f.keys()})
    return tensors


def test_weights_are_read_into_the_param_dtype_and_only_the_scorers_are_initialised():
    model = hf.from_pretrained(FIXTURES / "qwen2", param_dtype="bfloat16", attention="sparsek", topk=2, window=2,
                               scorer_init_std=0.5, rngs=nnx.Rngs(7))
    stored = _tensors(FIXTURES / "qwen2")  # bfloat16 weights
    assert {a.dtype for a in _parameters(model).values()} == {np.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(_parameters(model)[("embed",)], stored["model.embed_tokens.weight"])
    np.testing.assert_array_equal(_parameters(model)[("blocks", 1, "mlp", "down")],
                                  stored["model.layers.1.mlp.down_proj.weight"].T)
    # The scorers get what creating the model with the same rngs gives them.
    created = TransformerLM(model.config, rngs=nnx.Rngs(7))
    for i in range(model.config.num_layers):
        np.testing.assert_array_equal(np.asarray(model.blocks[i].attention.scorer.w_score[...]),
                                      np.asarray(created.blocks[i].attention.scorer.w_score[...]))


@pytest.mark.parametrize("name, overrides", [("llama", {}), ("qwen2", {"param_dtype": "bfloat16"}),
                                             ("mistral", {"scan_layers": True})])
def test_sharded_export_reimports_bit_exactly(name, overrides, tmp_path):
    model = hf.from_pretrained(FIXTURES / name, **overrides)
    out = hf.save_pretrained(model, tmp_path / "out", max_shard_size=8_000)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    exported, original = _tensors(out), _tensors(FIXTURES / name)
    assert sorted(exported) == sorted(original) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in exported.values())
    for key, tensor in original.items():  # bfloat16 stays bfloat16, bit for bit
        np.testing.assert_array_equal(exported[key], tensor, err_msg=key)
        assert exported[key].dtype == tensor.dtype, key
    again = hf.from_pretrained(out, **overrides)
    for path, value in _parameters(model).items():
        np.testing.assert_array_equal(_parameters(again)[path], value, err_msg=str(path))


def test_every_device_receives_only_its_slice():
    """On 8 CPU devices (a subprocess): from_pretrained(mesh=...) with plain and scanned layers and the training
    app's path (created sharded, then load_pretrained_weights) give every device exactly its slice of every
    parameter (and of the optimizer state created for the model the training app builds from the files), the
    reference logits, and an export that re-imports bit for bit."""
    script = f"""
import jax, jax.numpy as jnp, numpy as np, tempfile
from flax import nnx
from sparsek_jax.nn import TransformerLM, huggingface as hf
from sparsek_train.initial_weights import pretrained_model
from sparsek_jax.nn.sharding import activate, create_sharded
import optax
path = {str(FIXTURES / "llama")!r}
mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
tokens, expected = np.load({str(FIXTURES / "tokens.npy")!r}), np.load(path + "/logits.npy")
with activate(mesh):
    models = [hf.from_pretrained(path, mesh=mesh), hf.from_pretrained(path, mesh=mesh, scan_layers=True)]
    models.append(create_sharded(mesh, lambda: TransformerLM(models[0].config, rngs=nnx.Rngs(1))))
    hf.load_pretrained_weights(models[2], path)
    # The training app's path: built from the files, then the optimizer created sharded for it.
    models.append(pretrained_model(models[0].config, path, mesh=mesh, seed=1, log=lambda message: None))
    optimizer = create_sharded(mesh, lambda m: nnx.Optimizer(m, optax.adam(1e-3), wrt=nnx.Param), models[3])
    for model in models + [optimizer]:
        for _, variable in nnx.iter_graph(model):
            if isinstance(variable, nnx.Variable):
                array = variable.get_value()
                assert isinstance(array.sharding, jax.sharding.NamedSharding), array.sharding
                assert len(array.addressable_shards) == 8
                for shard in array.addressable_shards:
                    assert shard.data.shape == array.sharding.shard_shape(array.shape)
                    assert shard.data.devices() == {{shard.device}}
    for model in models:
        logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
        np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=1e-4)
    assert len(models[0].embed[...].sharding.device_set) == 8
    out = hf.save_pretrained(models[1], tempfile.mkdtemp() + "/out", max_shard_size=20_000)
    again = hf.from_pretrained(out, scan_layers=True)
    for (p, a), (_, b) in zip(nnx.iter_graph(models[1]), nnx.iter_graph(again)):
        if isinstance(a, nnx.Variable):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
print("ok")
"""
    env = cpu_devices_env(8)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _export(tmp_path, max_shard_size=8_000):
    return hf.save_pretrained(hf.from_pretrained(FIXTURES / "llama"), tmp_path / "sharded",
                              max_shard_size=max_shard_size)


def test_damaged_checkpoints_are_refused_by_name_before_anything_changes(tmp_path):
    sharded = _export(tmp_path)
    model = hf.from_pretrained(FIXTURES / "llama")
    kept = _parameters(model)
    shards = sorted(sharded.glob("*.safetensors"))
    count = len(shards)
    third = shards[2]
    assert third.name == f"model-00003-of-{count:05d}.safetensors"
    whole = third.read_bytes()
    third.write_bytes(whole[:-10])
    with pytest.raises(hf.CheckpointFormatError, match=rf"{third.name}: truncated: tensor "
                                                       r"\S+ ends at byte \d+, the file has \d+ bytes"):
        hf.load_pretrained_weights(model, sharded)
    for path, value in _parameters(model).items():  # every tensor is checked before the first is read
        np.testing.assert_array_equal(value, kept[path])
    third.unlink()
    with pytest.raises(hf.CheckpointFormatError, match=rf"model.safetensors.index.json: shard {third.name} is "
                                                       rf"missing from .* \(1 of {count} shards missing\)"):
        hf.from_pretrained(sharded)
    third.write_bytes(whole)
    shards[1].write_bytes(b"\x05")
    with pytest.raises(hf.CheckpointFormatError, match="truncated or not a safetensors file"):
        hf.load_pretrained_weights(model, sharded)

    from safetensors.numpy import save_file

    quantised = _copy("llama", tmp_path)
    tensors = {name: np.asarray(t) for name, t in _tensors(quantised).items()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int8)
    save_file(tensors, str(quantised / "model.safetensors"))
    with pytest.raises(hf.CheckpointFormatError, match=r"tensor model.norm.weight: dtype: expected one of "
                                                       r"\('F64', 'F32', 'F16', 'BF16'\), received 'I8'"):
        hf.from_pretrained(quantised)


def test_the_training_app_names_a_damaged_checkpoint(tmp_path):
    from sparsek_train.checkpointing import CheckpointError
    from sparsek_train.initial_weights import load_initial_weights

    sharded = _export(tmp_path)
    shards = sorted(sharded.glob("*.safetensors"))
    for file in shards:
        file.unlink()  # only config.json and the index are left
    model = TransformerLM(hf.model_config_from_pretrained(sharded), rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match=rf"train.init_from: .*shard {shards[0].name} is missing .*"
                                              rf"\({len(shards)} of {len(shards)} shards missing\)"):
        load_initial_weights(model, sharded)


def test_export_refuses_a_non_empty_directory_and_never_leaves_a_partial_checkpoint(tmp_path, monkeypatch):
    model = hf.from_pretrained(FIXTURES / "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"path: expected a new or empty directory, received .*out, which "
                                              r"holds 1 entries \(notes.txt\); pass overwrite=True"):
        hf.save_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    hf.save_pretrained(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    written = []

    def fails_on_the_third_file(file, exports):
        if len(written) == 2:
            file.write_bytes(b"half")
            raise OSError(28, "No space left on device")
        written.append(file)
        original(file, exports)

    original = hf._write_safetensors
    monkeypatch.setattr(hf, "_write_safetensors", fails_on_the_third_file)
    for target, overwrite in ((tmp_path / "new", False), (out, True)):
        written.clear()
        with pytest.raises(OSError, match=r"path: writing the checkpoint into .* failed, nothing was written there "
                                          r"\(OSError: \[Errno 28\] No space left on device\)"):
            hf.save_pretrained(model, target, max_shard_size=8_000, overwrite=overwrite)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left
    with pytest.raises(ValueError, match=r"max_shard_size: expected a positive number of bytes, received 0"):
        hf.save_pretrained(model, tmp_path / "other", max_shard_size=0)
