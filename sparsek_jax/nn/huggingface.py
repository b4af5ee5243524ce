"""Llama-family checkpoints in the Hugging Face layout (``config.json`` + ``*.safetensors``): import into a
``TransformerLM`` with any attention kind per layer, and export dense (or sliding-window) models back.

    config = model_config_from_pretrained("path/to/Llama-3.2-1B", attention="sparsek", topk=256, window=256)
    model = TransformerLM(config, rngs=nnx.Rngs(0))   # or created sharded on a mesh
    load_pretrained_weights(model, "path/to/Llama-3.2-1B")
    save_pretrained(dense_model, "exported/")

Supported: ``model_type`` llama (Llama 2, 3, 3.1+ and SmolLM2 shapes), mistral and qwen2 (Qwen2, Qwen2.5):
RMSNorm, SwiGLU, RoPE with its base and its ``linear`` or ``llama3`` scaling, GQA, a ``head_dim`` of its own,
q/k/v (and output) biases, tied or untied embeddings, Mistral's sliding window. Tensors are read with the
``safetensors`` package, one at a time, and each is placed directly with the sharding of the parameter it
fills, so a model larger than one device's memory loads onto its mesh.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsek_jax.nn.config import ModelConfig
from sparsek_jax.nn.rope import RopeScaling

MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Buffers some older checkpoints carry; recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointFormatError(ValueError):
    """A checkpoint that does not fit: unsupported architecture, missing, unexpected or misshapen tensors."""


def read_pretrained_config(path: str | Path) -> dict:
    """The ``config.json`` of a checkpoint directory."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointFormatError(f"path: expected a Hugging Face checkpoint directory with config.json, "
                                    f"received {str(path)!r}")
    return json.loads(file.read_text())


def _rope_scaling(hf: dict) -> RopeScaling | None:
    scaling = hf.get("rope_scaling")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        return RopeScaling(kind="llama3", factor=float(scaling["factor"]),
                           low_freq_factor=float(scaling["low_freq_factor"]),
                           high_freq_factor=float(scaling["high_freq_factor"]),
                           original_max_position=int(scaling["original_max_position_embeddings"]))
    raise CheckpointFormatError(f"config.json: rope_scaling.rope_type: expected one of ('default', 'linear', "
                                f"'llama3'), received {kind!r}")


def model_config_from_pretrained(path_or_config: str | Path | dict, **overrides) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint; ``overrides`` set any other field, e.g. ``attention`` (one kind or
    one per layer), ``topk``, ``window``, ``dtype``, ``param_dtype``, ``max_decode_length``."""
    hf = path_or_config if isinstance(path_or_config, dict) else read_pretrained_config(path_or_config)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointFormatError(f"config.json: model_type: expected one of {MODEL_TYPES}, received "
                                    f"{model_type!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointFormatError(f"config.json: hidden_act: expected 'silu' (SwiGLU), received "
                                    f"{hf['hidden_act']!r}")
    if hf.get("mlp_bias"):
        raise CheckpointFormatError("config.json: mlp_bias: expected false (the MLP has no biases), received true")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise CheckpointFormatError("config.json: use_sliding_window: expected false (Qwen2's per-layer sliding "
                                    "window is not supported), received true")
    heads = hf["num_attention_heads"]
    values = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
        rope_base=float(hf.get("rope_theta", 10_000.0)), rope_scaling=_rope_scaling(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        scale_embeddings=False, qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        out_bias=model_type == "llama" and bool(hf.get("attention_bias", False)), attention="dense")
    if model_type == "mistral" and hf.get("sliding_window"):
        values.update(attention="sliding", window=int(hf["sliding_window"]))
    values.update(overrides)
    return ModelConfig(**values)


# -- the tensor map: one entry per parameter, both directions --------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str                     # the Hugging Face tensor name
    path: tuple                   # the parameter's path in the (unscanned) model
    to_model: callable            # Hugging Face array -> our layout
    to_hf: callable               # our layout -> Hugging Face array


def _linear(shape_out):
    """``nn.Linear`` weights ``[out, in]`` <-> our ``[in, *shape_out]``."""
    return (lambda w: w.T.reshape(w.shape[1], *shape_out),
            lambda p: p.reshape(p.shape[0], -1).T)


def _tensor_map(config: ModelConfig) -> list[_Tensor]:
    c, same = config, (lambda x: x, lambda x: x)
    h, kv, d = c.num_heads, c.num_kv_heads, c.head_dim
    entries = [_Tensor("model.embed_tokens.weight", ("embed",), *same),
               _Tensor("model.norm.weight", ("final_norm", "scale"), *same)]
    if not c.tie_embeddings:
        entries.append(_Tensor("lm_head.weight", ("unembed",), lambda w: w.T, lambda p: p.T))
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}.", ("blocks", i)
        attention = ours + ("attention",)
        entries += [
            _Tensor(hf + "input_layernorm.weight", ours + ("attention_norm", "scale"), *same),
            _Tensor(hf + "post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), *same),
            _Tensor(hf + "self_attn.q_proj.weight", attention + ("q_proj",), *_linear((h, d))),
            _Tensor(hf + "self_attn.k_proj.weight", attention + ("k_proj",), *_linear((kv, d))),
            _Tensor(hf + "self_attn.v_proj.weight", attention + ("v_proj",), *_linear((kv, d))),
            # o_proj [d_model, heads * head_dim] <-> ours [heads, head_dim, d_model]
            _Tensor(hf + "self_attn.o_proj.weight", attention + ("o_proj",),
                    lambda w: w.T.reshape(h, d, w.shape[0]), lambda p: p.reshape(-1, p.shape[-1]).T),
            _Tensor(hf + "mlp.gate_proj.weight", ours + ("mlp", "gate"), lambda w: w.T, lambda p: p.T),
            _Tensor(hf + "mlp.up_proj.weight", ours + ("mlp", "up"), lambda w: w.T, lambda p: p.T),
            _Tensor(hf + "mlp.down_proj.weight", ours + ("mlp", "down"), lambda w: w.T, lambda p: p.T),
        ]
        if c.qkv_bias:
            entries += [_Tensor(hf + f"self_attn.{n}_proj.bias", attention + (f"{n}_bias",),
                                lambda b, heads=heads: b.reshape(heads, d), lambda p: p.reshape(-1))
                        for n, heads in (("q", h), ("k", kv), ("v", kv))]
        if c.out_bias:
            entries.append(_Tensor(hf + "self_attn.o_proj.bias", attention + ("o_bias",), *same))
    return entries


def _variable(model, path):
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _model_variable(model, path):
    """The variable a tensor fills and, with ``scan_layers``, the layer index into its stacked value."""
    if model.config.scan_layers and path[0] == "blocks":
        return _variable(model.blocks, path[2:]), path[1]
    return _variable(model, path), None


# -- reading ---------------------------------------------------------------------------------------------------

class _SafetensorsReader:
    """The tensors of a checkpoint directory (one ``*.safetensors`` file or an index of shards), read one at
    a time into host memory (bfloat16 included)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise CheckpointFormatError(f"path: expected *.safetensors files in {str(path)!r}, found none")
        self._cpu = jax.devices("cpu")[0]
        self._files, self._where = {}, {}
        with jax.default_device(self._cpu):
            for file in files:
                handle = safe_open(str(path / file), framework="flax")
                self._files[file] = handle
                for name in handle.keys():
                    self._where[name] = file

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._files[self._where[name]].get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        with jax.default_device(self._cpu):
            return np.asarray(self._files[self._where[name]].get_tensor(name))


def load_pretrained_weights(model, path: str | Path) -> None:
    """Fills ``model`` (a ``TransformerLM`` whose config matches the checkpoint, e.g. from
    ``model_config_from_pretrained``) with the checkpoint's tensors, in place. Every parameter keeps its
    sharding: each device receives only its shard. Parameters the layout has no tensor for (the scoring
    networks of ``sparsek`` layers) keep their initial values: ``w_score = 0``, so selection starts as the most
    recent keys before the window. A missing, unexpected or misshapen tensor is an error that names it."""
    path = Path(path)
    model_type = read_pretrained_config(path).get("model_type")
    reader = _SafetensorsReader(path)
    entries = _tensor_map(model.config)
    expected = {e.name for e in entries}
    available = {n for n in reader.names() if not n.endswith(_IGNORED_SUFFIXES)}
    if model.config.tie_embeddings:
        available.discard("lm_head.weight")  # some tied checkpoints store the copy
    missing, unexpected = sorted(expected - available), sorted(available - expected)
    if missing:
        raise CheckpointFormatError(f"{path}: tensor {missing[0]} missing ({len(missing)} of {len(expected)} "
                                    f"expected tensors missing; model_type {model_type!r})")
    if unexpected:
        raise CheckpointFormatError(f"{path}: tensor {unexpected[0]} is not used by this model config "
                                    f"({len(unexpected)} unexpected; e.g. biases or a layer count that the "
                                    f"config does not have)")
    stacked: dict[int, list] = {}
    for entry in entries:
        variable, layer = _model_variable(model, entry.path)
        target_shape = variable.shape[1:] if layer is not None else variable.shape
        hf_shape = reader.shape(entry.name)
        expected_hf = entry.to_hf(np.empty(target_shape, np.int8)).shape
        if hf_shape != expected_hf:
            raise CheckpointFormatError(f"{path}: tensor {entry.name}: expected shape {expected_hf} for the model "
                                        f"config, the checkpoint holds {hf_shape}")
        value = entry.to_model(reader.read(entry.name)).astype(variable[...].dtype)
        if layer is None:
            _place(variable, value)
        else:
            stacked.setdefault(id(variable), [variable, [None] * model.config.num_layers])[1][layer] = value
    for variable, layers in stacked.values():
        _place(variable, np.stack(layers))


def _place(variable, value: np.ndarray) -> None:
    current = variable[...]
    sharding = current.sharding
    variable.set_value(jax.make_array_from_callback(value.shape, sharding, lambda index: value[index]))


# -- writing ---------------------------------------------------------------------------------------------------

def _model_type_for(config: ModelConfig) -> str:
    kinds = set(config.layer_kinds)
    for kind, why in (("sparsek", "its scoring network"), ("block_topk", "block top-k attention")):
        if kind in kinds:
            raise CheckpointFormatError(f"model: layer {config.layer_kinds.index(kind)} is {kind!r}: the Hugging "
                                        f"Face layout has no place for {why} (export models whose layers are all "
                                        f"dense, or all sliding)")
    if kinds == {"dense", "sliding"}:
        raise CheckpointFormatError("model: expected every layer dense or every layer sliding, received both")
    if config.qkv_bias and not config.out_bias:
        if kinds == {"sliding"}:
            raise CheckpointFormatError("model: q/k/v biases with a sliding window have no Hugging Face layout here")
        return "qwen2"
    if kinds == {"sliding"}:
        if config.qkv_bias:
            raise CheckpointFormatError("model: biases with a sliding window have no Hugging Face layout here")
        return "mistral"
    if config.out_bias and not config.qkv_bias:
        raise CheckpointFormatError("model: an output bias without q/k/v biases has no Hugging Face layout")
    return "llama"


def pretrained_config(config: ModelConfig) -> dict:
    """The ``config.json`` of a model (dense or sliding layers only)."""
    model_type = _model_type_for(config)
    c = config
    hf = {"architectures": [_ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": c.vocab_size,
          "hidden_size": c.d_model, "intermediate_size": c.mlp_dim, "num_hidden_layers": c.num_layers,
          "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
          "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_base,
          "tie_word_embeddings": c.tie_embeddings and not c.scale_embeddings,
          "max_position_embeddings": c.max_decode_length, "torch_dtype": c.param_dtype}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        hf["rope_scaling"] = ({"rope_type": "linear", "factor": s.factor} if s.kind == "linear" else {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position})
    if model_type == "llama":
        hf.update(attention_bias=c.qkv_bias, mlp_bias=False)
    elif model_type == "mistral":
        hf["sliding_window"] = c.window
    else:
        hf["use_sliding_window"] = False
    return hf


def save_pretrained(model, path: str | Path) -> Path:
    """Writes ``model`` (dense or sliding layers) as ``config.json`` + ``model.safetensors`` in the Hugging Face
    layout. A model trained with ``scale_embeddings`` (the default of models built here) is written with the
    scale folded into untied input and output embeddings, which computes the same logits."""
    from safetensors.flax import save_file

    config = model.config
    hf_config = pretrained_config(config)
    export_config = dataclasses.replace(config, tie_embeddings=hf_config["tie_word_embeddings"])
    tensors = {}
    for entry in _tensor_map(export_config):
        if entry.name == "lm_head.weight" and config.tie_embeddings:  # folded scale: embed / sqrt(d_model)
            value = np.asarray(model.embed[...]).T / np.float32(config.d_model ** 0.5)
        else:
            variable, layer = _model_variable(model, entry.path)
            value = np.asarray(variable[...] if layer is None else variable[...][layer])
            if entry.name == "model.embed_tokens.weight" and config.scale_embeddings:
                value = value * np.float32(config.d_model ** 0.5)
        tensors[entry.name] = jnp.asarray(entry.to_hf(value).astype(value.dtype))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return path


def from_pretrained(path: str | Path, *, rngs: nnx.Rngs | None = None, **overrides):
    """A ``TransformerLM`` with the checkpoint's weights, on the default device (for a mesh, create the model
    sharded and call ``load_pretrained_weights``)."""
    from sparsek_jax.nn.transformer import TransformerLM

    model = TransformerLM(model_config_from_pretrained(path, **overrides), rngs=rngs or nnx.Rngs(0))
    load_pretrained_weights(model, path)
    return model
