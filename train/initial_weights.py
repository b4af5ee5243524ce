"""Weights from elsewhere: a run of ours whose model may differ in its attention (dense -> sparsek, sliding ->
sparsek, ... with any window and topk), or a Hugging Face checkpoint directory. Used to start a run
(``train.init_from``) and by evaluation and generation (``checkpoint=``).

Every parameter of the model must come from the source, except the scoring networks of layers the source
did not have as ``sparsek``: those keep their initialisation (``w_score = 0``: selection starts as the most
recent keys before the window). Scoring networks of the source that the model has no place for (a sparsek
layer evaluated as dense) are dropped. Everything else that does not fit is an error naming the parameter.
"""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from sparsek_jax.nn import huggingface
from sparsek_jax.nn.scoring import is_scorer_parameter
from sparsek_train.checkpointing import CheckpointError, RunCheckpoints, parameter_name, resolve_checkpoint
from sparsek_train.config import ConfigError

# The Hugging Face config fields that define the architecture, and their ModelConfig names.
_ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                        "rope_base", "rope_scaling", "norm_eps", "tie_embeddings", "scale_embeddings", "qkv_bias",
                        "out_bias")


def is_pretrained_directory(path: str | Path) -> bool:
    """A ``config.json`` with safetensors files, or with the index of its shards (a missing shard is then
    reported by name)."""
    path = Path(path)
    return (path / "config.json").is_file() and ((path / huggingface.INDEX_FILE).is_file()
                                                 or any(path.glob("*.safetensors")))


def load_initial_weights(model, source: str | Path, *, key: str = "train.init_from", log=print) -> None:
    """Fills ``model`` in place from ``source`` (see the module docstring), keeping every parameter's dtype and
    sharding; a Hugging Face checkpoint is read one tensor at a time, each device receiving only its slice, and
    checked whole before any parameter changes. Run this under the mesh the model was created on."""
    if is_pretrained_directory(source):
        _from_pretrained(model, Path(source), key, log)
    else:
        _from_run(model, source, key, log)


def pretrained_model(config, source: str | Path, *, mesh, seed: int, key: str = "train.init_from", log=print):
    """A model of ``config`` (a ``ModelConfig``) holding the weights of the Hugging Face checkpoint ``source``,
    built without initialising first: every parameter is read into its dtype and each device's slice on
    ``mesh`` (call this under ``activate(mesh)``); the scoring networks get what ``nnx.Rngs(seed)`` gives them
    when the model is created, as in a fresh run."""
    path = Path(source)
    _check_fits(config, path, key)
    try:
        model = huggingface.pretrained_model(config, path, mesh=mesh, rngs=nnx.Rngs(seed))
    except huggingface.CheckpointFormatError as error:
        raise CheckpointError(f"{key}: {error}") from None
    _log_pretrained(path, model, log)
    return model


def _check_fits(config, path: Path, key: str) -> None:
    try:
        wanted = huggingface.model_config_from_pretrained(path)
    except (huggingface.CheckpointFormatError, ValueError) as error:
        raise ConfigError(f"{key}: {error}") from None
    differences = [(f, getattr(wanted, f), getattr(config, f)) for f in _ARCHITECTURE_FIELDS
                   if getattr(wanted, f) != getattr(config, f)]
    if differences:
        listed = ", ".join(f"model.{f}: {w!r} in the checkpoint, {h!r} in the config" for f, w, h in differences)
        raise ConfigError(f"{key}: {path} does not fit the model section ({listed})")


def _log_pretrained(path: Path, model, log) -> None:
    log(f"weights from {path} ({model.config.num_layers} layers, {model.config.layer_kinds.count('sparsek')} of "
        f"them now sparsek, with new scorers)")


def _from_pretrained(model, path: Path, key: str, log) -> None:
    _check_fits(model.config, path, key)
    try:
        huggingface.load_pretrained_weights(model, path)
    except huggingface.CheckpointFormatError as error:
        raise CheckpointError(f"{key}: {error}") from None
    _log_pretrained(path, model, log)


def _from_run(model, source, key: str, log) -> None:
    try:
        directory, step = resolve_checkpoint(str(source))
    except ValueError:
        missing = "" if Path(source).exists() else " (nothing is there: train the model to start from first)"
        raise ConfigError(f"{key}: expected a run directory, a checkpoint step directory or a Hugging Face "
                          f"checkpoint directory (config.json + *.safetensors), received {str(source)!r}"
                          f"{missing}") from None
    state = nnx.state(model, nnx.Param)
    pure = state.to_pure_dict()
    ours = {parameter_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}
    checkpoints = RunCheckpoints(directory, read_only=True)
    try:
        saved = checkpoints.model_metadata(step)
        for name, value in ours.items():
            if name not in saved:
                if not is_scorer_parameter(name):
                    raise CheckpointError(f"{key}: model parameter {name}: expected shape {tuple(value.shape)}, "
                                          f"missing from {directory} step {step}")
            elif tuple(saved[name].shape) != tuple(value.shape):
                raise CheckpointError(f"{key}: model parameter {name}: expected shape {tuple(value.shape)}, the "
                                      f"checkpoint holds {tuple(saved[name].shape)}")
        extra = sorted(n for n in saved if n not in ours and not is_scorer_parameter(n))
        if extra:
            raise CheckpointError(f"{key}: checkpoint parameter {extra[0]} (shape {tuple(saved[extra[0]].shape)}) "
                                  f"has no place in the model ({len(extra)} such parameters; was it made with "
                                  f"another model config?)")
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        targets = {name: jax.ShapeDtypeStruct(meta.shape, meta.dtype,
                                              sharding=ours[name].sharding if name in ours else cpu)
                   for name, meta in saved.items()}
        restored = checkpoints.read_model(step, targets)
    finally:
        checkpoints.close()

    def restored_or_kept(path, leaf):
        name = parameter_name(path)
        return restored[name].astype(leaf.dtype) if name in restored else leaf

    new = jax.tree_util.tree_map_with_path(restored_or_kept, pure)
    nnx.replace_by_pure_dict(state, new)
    nnx.update(model, state)
    fresh = sorted(n for n in ours if n not in saved)
    dropped = sorted(n for n in saved if n not in ours)
    note = (f"; {len(fresh)} scoring-network parameters start at their initialisation" if fresh else "") + (
        f"; {len(dropped)} of the source's scoring-network parameters are not used" if dropped else "")
    log(f"weights from {directory / str(step)}{note}")
