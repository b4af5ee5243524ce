"""Llama-family checkpoints in the Hugging Face layout (``config.json`` + ``*.safetensors``): import into a
``TransformerLM`` with any attention kind per layer, and export dense (or sliding-window) models back.

    model = from_pretrained("path/to/Llama-3.2-1B", attention="sparsek", topk=256, window=256,
                            param_dtype="bfloat16")          # with mesh=..., each device gets its slice
    save_pretrained(dense_model, "exported/", max_shard_size=2 * 10**9)

Supported: ``model_type`` llama (Llama 2, 3, 3.1+ and SmolLM2 shapes), mistral and qwen2 (Qwen2, Qwen2.5):
RMSNorm, SwiGLU, RoPE with its base and its ``linear`` or ``llama3`` scaling, GQA, a ``head_dim`` of its own,
q/k/v (and output) biases, tied or untied embeddings, Mistral's sliding window.

Import builds the model abstractly (shapes, dtypes and shardings; no values) and reads each parameter from the
memory-mapped safetensors files (one file, or any number of shards through the index) straight into its dtype
and, device by device, its slice: host memory holds the model's parameters (on a CPU backend, where they live)
plus about one tensor. Export gathers one tensor at a time into files of a bounded size, written into a
temporary directory that is renamed when complete. The safetensors format (an 8-byte little-endian header
length, a JSON header naming each tensor's dtype, shape and byte range, then the bytes) is read and written
here directly: that is what lets a tensor be mapped, sliced and streamed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import flax.core.spmd
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
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes of tensor data per file, as transformers writes
# The safetensors dtypes of floating-point weights; bfloat16 is the numpy type JAX uses (ml_dtypes).
_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
           "BF16": np.dtype(jnp.bfloat16)}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# The CPU backend adopts a host buffer aligned to this many bytes as a device buffer instead of copying it.
_ALIGNMENT = 64


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


# -- safetensors files -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Stored:
    """Where one tensor of a checkpoint lies: its file, the byte offset of its data in it, shape and dtype."""
    file: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def map(self) -> np.ndarray:
        """The tensor ``shape`` memory-mapped read-only: pages are read as they are touched and leave the
        process's memory when the array and every view of it are dropped."""
        return np.memmap(self.file, self.dtype, "r", self.offset, self.shape)


def _read_header(file: Path) -> dict[str, _Stored]:
    """The tensors of one safetensors file by name, after checking that their dtypes are known and that the file
    holds all their bytes."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + length > size:
            raise CheckpointFormatError(f"{file}: truncated or not a safetensors file: its header needs "
                                        f"{8 + length} bytes, the file has {size}")
        try:
            header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            described = {name: (info["dtype"], tuple(int(n) for n in info["shape"]),
                                tuple(int(n) for n in info["data_offsets"])) for name, info in header.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise CheckpointFormatError(f"{file}: expected a safetensors header (JSON naming each tensor's "
                                        f"dtype, shape and data_offsets), received one that is not "
                                        f"({type(error).__name__}: {error})") from None
    tensors = {}
    for name, (dtype_name, shape, (begin, end)) in described.items():
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointFormatError(f"{file}: tensor {name}: dtype: expected one of {tuple(_DTYPES)}, "
                                        f"received {dtype_name!r}")
        if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointFormatError(f"{file}: tensor {name}: data_offsets {[begin, end]} do not hold a "
                                        f"{dtype_name} tensor of shape {shape}")
        if 8 + length + end > size:
            raise CheckpointFormatError(f"{file}: truncated: tensor {name} ends at byte {8 + length + end}, "
                                        f"the file has {size} bytes")
        tensors[name] = _Stored(file, 8 + length + begin, shape, dtype)
    return tensors


def _checkpoint_tensors(path: Path) -> dict[str, _Stored]:
    """Every tensor of a checkpoint directory by name: those of the shards its index lists, or of its
    ``*.safetensors`` files when it has no index."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointFormatError(f"{index}: expected JSON with a weight_map (tensor name -> file), "
                                        f"received one without ({type(error).__name__}: {error})") from None
        files = sorted(set(weight_map.values()))
        missing = [file for file in files if not (path / file).is_file()]
        if missing:
            raise CheckpointFormatError(f"{index}: shard {missing[0]} is missing from {path} ({len(missing)} of "
                                        f"{len(files)} shards missing)")
    else:
        weight_map, files = {}, sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointFormatError(f"path: expected *.safetensors files in {str(path)!r}, found none")
    tensors = {}
    for file in files:
        for name, stored in _read_header(path / file).items():
            if name in tensors:
                raise CheckpointFormatError(f"{path}: tensor {name} is stored twice, in {tensors[name].file.name} "
                                            f"and in {file}")
            tensors[name] = stored
    for name, file in weight_map.items():
        if name not in tensors or tensors[name].file.name != file:
            raise CheckpointFormatError(f"{index}: tensor {name}: expected in {file}, which does not hold it")
    return tensors


# -- reading ---------------------------------------------------------------------------------------------------

def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``_ALIGNMENT``-byte boundary."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _assemble(shape: tuple[int, ...], dtype: np.dtype, sharding, fill) -> jax.Array:
    """An array of ``shape`` and ``dtype`` placed with ``sharding``, built device by device: ``fill(buffer,
    index)`` writes the slice ``index`` (a tuple of slices) into a fresh host buffer of that slice's shape. The
    CPU backend adopts the buffer as the device's (it is aligned); other backends copy it to the device, after
    which it is freed: host memory holds one device's slice at a time."""
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        buffer = _aligned_empty(tuple(len(range(*s.indices(n))) for s, n in zip(index, shape)), dtype)
        fill(buffer, index)
        arrays.append(jax.device_put(buffer, device, may_alias=True))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _read_parameter(target, parts: list[tuple[int | None, _Tensor, _Stored]]) -> jax.Array:
    """The value of a parameter whose current value ``target`` (an array, or a ``jax.ShapeDtypeStruct`` in an
    abstract model) gives its shape, dtype and sharding. ``parts`` holds its one tensor (layer ``None``) or, for
    layers stacked by ``scan_layers``, one tensor per layer of the leading axis. Each device's slice is read
    from the memory-mapped tensors, in this library's layout, straight into the parameter's dtype."""
    def fill(buffer, index):
        if parts[0][0] is None:
            _, entry, stored = parts[0]
            buffer[...] = entry.to_model(stored.map())[index]
            return
        by_layer = {layer: (entry, stored) for layer, entry, stored in parts}
        for i, layer in enumerate(range(*index[0].indices(target.shape[0]))):
            entry, stored = by_layer[layer]
            buffer[i] = entry.to_model(stored.map())[index[1:]]

    return _assemble(tuple(target.shape), np.dtype(target.dtype), target.sharding or _default_sharding(), fill)


def _fill(model, path: Path) -> None:
    """Sets every parameter of ``model`` that the checkpoint has a tensor for (all but the scoring networks) to
    that tensor, keeping the parameter's dtype and sharding. Every tensor name, shape, dtype and file is checked
    before the first parameter changes; a missing, unexpected or misshapen tensor is an error that names it."""
    model_type = read_pretrained_config(path).get("model_type")
    tensors = _checkpoint_tensors(path)
    entries = _tensor_map(model.config)
    expected = {e.name for e in entries}
    available = {n for n in tensors if not n.endswith(_IGNORED_SUFFIXES)}
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
    parameters: dict[int, tuple[nnx.Variable, list]] = {}
    for entry in entries:
        variable, layer = _model_variable(model, entry.path)
        shape = variable.get_value().shape
        layer_shape = jax.ShapeDtypeStruct(shape[1:] if layer is not None else shape, np.int8)
        expected_shape = jax.eval_shape(entry.to_hf, layer_shape).shape
        stored = tensors[entry.name]
        if stored.shape != expected_shape:
            raise CheckpointFormatError(f"{path}: tensor {entry.name}: expected shape {expected_shape} for the "
                                        f"model config, the checkpoint holds {stored.shape}")
        parameters.setdefault(id(variable), (variable, []))[1].append((layer, entry, stored))
    for variable, parts in parameters.values():
        variable.set_value(_read_parameter(variable.get_value(), parts))


def load_pretrained_weights(model, path: str | Path) -> None:
    """Fills ``model`` (a ``TransformerLM`` whose config matches the checkpoint, e.g. from
    ``model_config_from_pretrained``) with the checkpoint's tensors, in place, one parameter at a time: each
    keeps its dtype and sharding, and each device receives only its slice. Parameters the layout has no tensor
    for (the scoring networks of ``sparsek`` layers) keep their values. A checkpoint that does not fit (a
    missing shard or tensor, a shape the config does not have, a truncated file, a dtype other than float64,
    float32, float16 or bfloat16) is an error naming it, raised before any parameter changes."""
    _fill(model, Path(path))


def _abstract_model(config: ModelConfig, mesh):
    """A ``TransformerLM`` whose parameters are ``jax.ShapeDtypeStruct``s: with ``mesh``, with the shardings
    that the logical axis rules in effect give them there."""
    from sparsek_jax.nn.transformer import TransformerLM

    def create():
        return TransformerLM(config, rngs=nnx.Rngs(0))  # the keys do not matter: nothing is computed

    if mesh is None:
        return nnx.eval_shape(create)
    if not flax.core.spmd.get_logical_axis_rules():
        raise ValueError("mesh: expected a call under nnx.logical_axis_rules(...) mapping the parameters' logical "
                         "axes (embed, vocab, q_heads, kv_heads, head_dim, mlp) onto the mesh's axes, received "
                         "no rules (sparsek_jax.nn.sharding.activate(mesh) sets both)")
    # nnx.eval_shape under a mesh drops the shardings; get_abstract_model computes them from the logical axes.
    return nnx.merge(*nnx.get_abstract_model(create, mesh))


def _initialise_abstract(model, rngs: nnx.Rngs) -> None:
    """Gives the parameters of ``model`` that are still abstract (those the checkpoint has no tensor for) the
    values that creating the model with ``rngs`` gives them, with their shardings. The model's creation is
    traced whole but only those parameters are computed: the others' initialisers are dead code."""
    from sparsek_jax.nn.transformer import TransformerLM

    pending = [(path, variable) for path, variable in nnx.iter_graph(model)
               if isinstance(variable, nnx.Variable) and isinstance(variable.get_value(), jax.ShapeDtypeStruct)]
    if not pending:
        return
    config = model.config
    wanted = [(path, variable.get_value().sharding or _default_sharding()) for path, variable in pending]

    @nnx.jit
    def create(rngs):
        created = dict(nnx.iter_graph(TransformerLM(config, rngs=rngs)))
        return [jax.lax.with_sharding_constraint(created[path].get_value(), sharding) for path, sharding in wanted]

    for (_, variable), value in zip(pending, create(rngs)):
        variable.set_value(value)


def from_pretrained(path: str | Path, *, mesh: jax.sharding.Mesh | None = None, rngs: nnx.Rngs | None = None,
                    **overrides):
    """A ``TransformerLM`` with the checkpoint's weights; ``overrides`` set ``ModelConfig`` fields as in
    ``model_config_from_pretrained`` (``param_dtype`` is the dtype the weights are read into).

    The model is built abstractly and each parameter is read from the files into its place, so the weights are
    never held twice nor initialised first. Without ``mesh`` (and outside ``jax.set_mesh``, whose mesh is
    otherwise used) the parameters go to the default device; with one,
    each device receives only its slice of each parameter, sharded as the ``nnx.logical_axis_rules`` in effect
    map the parameters' logical axes onto ``mesh`` (call it under ``sparsek_jax.nn.sharding.activate(mesh)``).
    Parameters the checkpoint has no tensor for (the scoring networks of ``sparsek`` layers) get the values
    that ``TransformerLM(config, rngs=rngs)`` gives them (``rngs`` defaults to ``nnx.Rngs(0)``; ``w_score = 0``
    unless ``scorer_init_std`` is set). Errors as in ``load_pretrained_weights``."""
    return pretrained_model(model_config_from_pretrained(path, **overrides), path, mesh=mesh, rngs=rngs)


def pretrained_model(config: ModelConfig, path: str | Path, *, mesh: jax.sharding.Mesh | None = None,
                     rngs: nnx.Rngs | None = None):
    """``from_pretrained`` with the ``ModelConfig`` given whole (its architecture must be the checkpoint's, as
    ``model_config_from_pretrained`` gives it; the attention, dtypes and the rest are free)."""
    if mesh is None and not jax.sharding.get_mesh().empty:  # the mesh of an enclosing jax.set_mesh
        mesh = jax.sharding.get_mesh()
    model = _abstract_model(config, mesh)
    _fill(model, Path(path))
    _initialise_abstract(model, rngs or nnx.Rngs(0))
    return model


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


@dataclasses.dataclass(frozen=True)
class _Export:
    """One tensor to write: its Hugging Face name, shape and dtype, and ``gather()`` -> its value (host array)."""
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    gather: callable

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _exports(model, hf_config: dict) -> list[_Export]:
    """The tensors of the Hugging Face layout of ``model``, in the layout's order, each gathered from the
    devices only when written. A model with ``scale_embeddings`` has the scale folded into untied input
    (``embed * sqrt(d_model)``) and output (``embed / sqrt(d_model)``) embeddings: the same logits."""
    config = model.config
    scale = np.float32(config.d_model ** 0.5)
    exports = []
    for entry in _tensor_map(dataclasses.replace(config, tie_embeddings=hf_config["tie_word_embeddings"])):
        if entry.name == "lm_head.weight" and config.tie_embeddings:
            variable, layer = model.embed, None
            adjust = lambda embed: (embed.T.astype(np.float32) / scale).astype(embed.dtype)
        else:
            variable, layer = _model_variable(model, entry.path)
            scaled = entry.name == "model.embed_tokens.weight" and config.scale_embeddings
            adjust = (lambda embed: (embed.astype(np.float32) * scale).astype(embed.dtype)) if scaled else None
        target = variable.get_value()
        shape = target.shape[1:] if layer is not None else target.shape
        if adjust is not None:
            shape = jax.eval_shape(adjust, jax.ShapeDtypeStruct(shape, target.dtype)).shape

        def gather(variable=variable, layer=layer, adjust=adjust, to_hf=entry.to_hf):
            value = variable.get_value() if layer is None else variable.get_value()[layer]
            value = np.asarray(value)
            return np.ascontiguousarray(to_hf(adjust(value) if adjust is not None else value))

        hf_shape = jax.eval_shape(entry.to_hf, jax.ShapeDtypeStruct(shape, target.dtype)).shape
        exports.append(_Export(entry.name, tuple(hf_shape), np.dtype(target.dtype), gather))
    return exports


def _shards(exports: list[_Export], max_shard_size: int) -> list[list[_Export]]:
    """Consecutive tensors grouped into files of at most ``max_shard_size`` bytes of data (a larger tensor gets a
    file of its own)."""
    shards, size = [[]], 0
    for export in exports:
        if shards[-1] and size + export.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(export)
        size += export.nbytes
    return shards


def _write_safetensors(file: Path, exports: list[_Export]) -> None:
    """One safetensors file: the header (every tensor's dtype, shape and byte range), then each tensor's bytes,
    gathered and written one at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for export in exports:
        header[export.name] = {"dtype": _DTYPE_NAMES[export.dtype], "shape": list(export.shape),
                               "data_offsets": [offset, offset + export.nbytes]}
        offset += export.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as other writers of the format do
    with open(file, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for export in exports:
            f.write(export.gather().reshape(-1).view(np.uint8))


def _check_destination(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"path: expected a directory to write the checkpoint into, received {path}, "
                              f"which is a file")
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if held and not overwrite:
        raise FileExistsError(f"path: expected a new or empty directory, received {path}, which holds "
                              f"{len(held)} entries ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); "
                              f"pass overwrite=True to replace it")


def _move_into_place(staging: Path, path: Path) -> None:
    """Renames the complete ``staging`` directory to ``path``; a ``path`` that exists (empty, or replaced on
    request) is moved aside first and deleted once the new checkpoint is in its place."""
    if not path.exists():
        os.rename(staging, path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.rename(path, aside)  # onto the empty directory mkdtemp made, so that the name stays unique
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(aside, path)
        raise
    shutil.rmtree(aside)


def save_pretrained(model, path: str | Path, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                    overwrite: bool = False) -> Path:
    """Writes ``model`` (dense or sliding layers) in the Hugging Face layout: ``config.json`` and
    ``model.safetensors``, or, when the tensors exceed ``max_shard_size`` bytes, ``model-00001-of-0000N.safetensors``
    files of at most that size (a larger tensor gets a file of its own) with ``model.safetensors.index.json``.
    Tensors keep the parameters' dtype and are gathered from the devices one at a time. A model trained with
    ``scale_embeddings`` (the default of models built here) is written with the scale folded into untied input
    and output embeddings, which computes the same logits.

    ``path`` must be new or an empty directory unless ``overwrite``. The files are written into a temporary
    directory next to ``path`` (``.NAME.*.partial``) that is renamed to ``path`` once complete: a write that
    fails leaves no partial checkpoint at ``path`` (and, unless the process is killed, no temporary directory)."""
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
        raise ValueError(f"max_shard_size: expected a positive number of bytes, received {max_shard_size!r}")
    hf_config = pretrained_config(model.config)
    path = Path(path)
    _check_destination(path, overwrite)
    shards = _shards(_exports(model, hf_config), max_shard_size)
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                    for i in range(1, len(shards) + 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        for name, shard in zip(names, shards):
            _write_safetensors(staging / name, shard)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for shard in shards for e in shard)},
                     "weight_map": {e.name: name for name, shard in zip(names, shards) for e in shard}}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        _move_into_place(staging, path)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise OSError(f"path: writing the checkpoint into {path} failed, nothing was written there "
                          f"({type(error).__name__}: {error})") from error
        raise
    return path
