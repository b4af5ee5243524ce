"""The run directory: created once, held by one training process at a time, and bound to its model config."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from pathlib import Path

import yaml

from sparsek_train.config import ConfigError, RunConfig, dump_config

LOCK_FILE = "run.lock"


def create(path: str) -> Path:
    """``train.run_dir`` as a directory (created if needed); a file of that name is an error."""
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir: expected a directory, received {str(run_dir)!r}, which is a file")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@contextlib.contextmanager
def locked(run_dir: Path):
    """Holds an exclusive lock on the run directory while training: a second training into the same directory
    fails at once, naming the process that holds it, instead of interleaving checkpoints and metrics. The lock
    is released when the process ends, however it ends."""
    path = run_dir / LOCK_FILE
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"train.run_dir: {str(run_dir)!r} is in use by {holder} (lock {path}); wait for it to "
                          f"finish or choose another train.run_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.close()


def check_same_model(run_dir: Path, config: RunConfig) -> None:
    """Resuming with another model (or tokenizer) would fail inside the restore, after the saved config was
    overwritten: compare first and name every key that differs."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = yaml.safe_load(dump_config(config))
    keys = [("model", f.name) for f in dataclasses.fields(config.model)] + [
        ("data", name) for name in ("dataset", "source_path", "tokenizer", "vocab_size")]
    differ = [f"{section}.{name}: {saved.get(section, {}).get(name)!r} in the run, {now[section][name]!r} now"
              for section, name in keys if saved.get(section, {}).get(name) != now[section][name]]
    if differ:
        raise ConfigError(f"train.run_dir: {str(run_dir)!r} holds checkpoints of another configuration "
                          f"({'; '.join(differ)}); resume with the run's config.yaml or choose another "
                          f"train.run_dir")
