"""Orbax checkpoints of a run: model, optimizer, data-iterator state and run metadata, per step.

Saves are asynchronous (training continues while the arrays are written), keep the newest N, and are atomic:
Orbax writes each step into a temporary directory and renames it when complete, so an interrupted save
never leaves a step that looks finished. The model and the optimizer are separate items, so evaluation and
generation restore the model alone.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, or none could be restored (the command exits with status 1)."""


def _abstract(state: nnx.State):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state.to_pure_dict())


def parameter_name(path) -> str:
    """A pytree path as the name errors and logs use: ``blocks/0/attention/q_proj``."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_shapes(name: str, saved, expected) -> None:
    """Every saved array has the shape the model expects; otherwise the first difference, by parameter name."""
    flat = jax.tree_util.tree_flatten_with_path(saved, is_leaf=lambda x: hasattr(x, "shape"))[0]
    saved_leaves = {parameter_name(path): leaf for path, leaf in flat}  # saved keys are strings ("0"), ours ints
    if not saved_leaves:
        raise ValueError(f"{name}: the checkpoint's array metadata is missing or empty")
    for path, want in jax.tree_util.tree_flatten_with_path(expected)[0]:
        got = saved_leaves.get(parameter_name(path))
        if got is None:
            raise CheckpointError(f"{name} parameter {parameter_name(path)}: expected shape {tuple(want.shape)}, "
                                  f"missing from the checkpoint")
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{name} parameter {parameter_name(path)}: expected shape {tuple(want.shape)}, the "
                                  f"checkpoint holds {tuple(got.shape)} (was it made with another model config?)")


@contextlib.contextmanager
def _absl_warnings_hidden(hidden: bool):
    """Orbax logs through absl, whose Python logger is named ``absl``; with ``hidden`` its warnings are dropped
    while the block runs (errors still show)."""
    logger = logging.getLogger("absl")
    level = logger.level
    if hidden:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class RunCheckpoints:
    def __init__(self, directory: Path, *, keep: int = 3, asynchronous: bool = True, read_only: bool = False):
        # A read-only manager is given no saving options (Orbax warns about each one it has to drop), and the
        # warning it logs on every construction that the directory is read only is kept out of evaluation's
        # and generation's output: reading only is what they asked for.
        saving = {"save_interval_steps": 0, "max_to_keep": None} if read_only else {"max_to_keep": keep}
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=asynchronous, create=not read_only,
                                               read_only=read_only, **saving)
        self.directory = Path(directory).absolute()
        handlers = {"model": ocp.StandardCheckpointHandler(), "optimizer": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        with _absl_warnings_hidden(read_only):
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending: int | None = None  # the step of an asynchronous save that may still fail

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model, optimizer, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Saves (asynchronously); a failure of this or of the previous asynchronous save raises
        ``CheckpointError`` naming the step."""
        try:
            saved = self.manager.save(step, force=force, args=ocp.args.Composite(
                model=ocp.args.StandardSave(nnx.state(model).to_pure_dict()),
                optimizer=ocp.args.StandardSave(nnx.state(optimizer).to_pure_dict()),
                data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)))
        except Exception as error:
            raise CheckpointError(f"saving the checkpoint of step {self._pending or step} into {self.directory} "
                                  f"failed: {type(error).__name__}: {error}") from None
        self._pending = step
        return saved

    def restore(self, step: int, model, optimizer=None) -> tuple[dict, dict]:
        """Restores into ``model`` (and ``optimizer``) in place, keeping their shardings; returns the data
        iterator state and the metadata. Arrays whose shape differs from the model's are named."""
        targets = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
        states = {name: nnx.state(obj) for name, obj in targets.items()}
        abstract = {name: _abstract(state) for name, state in states.items()}
        metadata = self.manager.item_metadata(step)
        for name, tree in abstract.items():
            _check_shapes(name, getattr(metadata[name], "tree", metadata[name]), tree)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()},
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        for name, state in states.items():
            nnx.replace_by_pure_dict(state, restored[name])
            nnx.update(targets[name], state)
        return restored["data"], restored["meta"]

    def model_metadata(self, step: int) -> dict:
        """The saved model arrays' metadata (``.shape``, ``.dtype``) by parameter name (``blocks/0/mlp/up``)."""
        metadata = self.manager.item_metadata(step)["model"]
        tree = getattr(metadata, "tree", metadata)
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
        if not flat:
            raise CheckpointError(f"{self.directory} step {step}: the model's array metadata is missing or empty")
        return {parameter_name(path): leaf for path, leaf in flat}

    def read_model(self, step: int, targets: dict) -> dict:
        """The saved model arrays by name, each restored as ``targets[name]`` (a ``jax.ShapeDtypeStruct`` with
        its sharding) says."""
        metadata = self.manager.item_metadata(step)["model"]
        tree = getattr(metadata, "tree", metadata)
        abstract = jax.tree_util.tree_map_with_path(lambda path, leaf: targets[parameter_name(path)], tree,
                                                    is_leaf=lambda x: hasattr(x, "shape"))
        restored = self.manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract)))
        flat = jax.tree_util.tree_flatten_with_path(restored["model"])[0]
        return {parameter_name(path): leaf for path, leaf in flat}

    def restore_newest(self, model, optimizer=None, log=print) -> tuple[int, dict, dict] | None:
        """Restores the newest readable checkpoint: a step that cannot be read (a truncated or deleted file, an
        empty directory) is reported and the next older one is tried. ``None`` when there is no checkpoint;
        ``CheckpointError`` when there are some but none can be read, or the model does not fit them."""
        failures = []
        for step in reversed(self.steps()):
            try:
                restored = self.restore(step, model, optimizer)
            except CheckpointError:
                raise
            except Exception as error:  # Orbax and TensorStore raise many kinds on damaged files
                failures.append(step)
                log(f"checkpoint step {step} in {self.directory} cannot be read ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200] if str(error) else ''}); trying an older one")
                continue
            # The run goes on from here and will save those steps again: keep the unreadable ones aside.
            for bad in failures:
                (self.directory / str(bad)).rename(self.directory / f"unreadable-{bad}")
                log(f"moved the unreadable checkpoint to {self.directory / f'unreadable-{bad}'}")
            self.manager.reload()
            return (step, *restored)
        if failures:
            raise CheckpointError(f"no readable checkpoint in {self.directory} (tried steps {failures})")
        return None

    def close(self) -> None:
        """Waits for the last asynchronous save; its failure raises ``CheckpointError``."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise CheckpointError(f"saving the checkpoint of step {self._pending} into {self.directory} failed: "
                                  f"{type(error).__name__}: {error}") from None
        finally:
            self.manager.close()


def resolve_checkpoint(path: str) -> tuple[Path, int]:
    """``path`` is a run directory (its newest step), its ``checkpoints`` directory, or one step directory."""
    path = Path(path)
    for directory in (path / "checkpoints", path):
        if directory.is_dir():
            steps = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
            if steps:
                return directory, steps[-1]
    if path.is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    raise ValueError(f"checkpoint: expected a run directory or a checkpoint step directory, received {str(path)!r} "
                     "(no checkpoint found there)")
