"""Orbax checkpoints of a run: model, optimizer, data-iterator state and run metadata, per step.

Saves are asynchronous (training continues while the arrays are written), keep the newest N, and are atomic:
Orbax writes each step into a temporary directory and renames it when complete, so an interrupted save
never leaves a step that looks finished. The model and the optimizer are separate items, so evaluation and
generation restore the model alone.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx


def _abstract(state: nnx.State):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state.to_pure_dict())


class RunCheckpoints:
    def __init__(self, directory: Path, *, keep: int = 3, asynchronous: bool = True, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                               create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("model", "optimizer", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, model, optimizer, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.state(model).to_pure_dict()),
            optimizer=ocp.args.StandardSave(nnx.state(optimizer).to_pure_dict()),
            data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, model, optimizer=None) -> tuple[dict, dict]:
        """Restores into ``model`` (and ``optimizer``) in place, keeping their shardings; returns the data
        iterator state and the metadata."""
        targets = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
        states = {name: nnx.state(obj) for name, obj in targets.items()}
        args = {name: ocp.args.StandardRestore(_abstract(state)) for name, state in states.items()}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **args, data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        for name, state in states.items():
            nnx.replace_by_pure_dict(state, restored[name])
            nnx.update(targets[name], state)
        return restored["data"], restored["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
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
