"""Runs of several processes on JAX's multi-controller runtime (``jax.distributed``): joining it, agreeing
across processes (on the config, on when to stop), doing once what must be done once, and gathering results.

Every process runs the same ``sparsek-train`` command. ``train.distributed: true`` joins the runtime: on
SLURM, Open MPI, Kubernetes and Cloud TPU JAX detects the cluster itself; anywhere else the coordinator's
address, the number of processes and this process's id come from ``train.cluster`` or the environment
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; ``sparsek-launch`` sets them for
processes on one machine). A process that dies is noticed by the others within
``train.cluster.heartbeat_timeout_s``, and they stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

from sparsek_train.config import ConfigError, RunConfig, dump_config

ENVIRONMENT = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
               "process_id": "JAX_PROCESS_ID"}


def initialize(config: RunConfig) -> None:
    """Joins the distributed runtime when ``train.distributed`` is set (before anything touches a device)."""
    if not config.train.distributed:
        return
    cluster = config.train.cluster
    explicit = {}
    for field, variable in ENVIRONMENT.items():
        value = getattr(cluster, field)
        if value is None and os.environ.get(variable):
            raw = os.environ[variable]
            try:
                value = raw if field == "coordinator_address" else int(raw)
            except ValueError:
                raise ConfigError(f"{variable}: expected an int, received {raw!r}") from None
        explicit[field] = value
    given = [f for f, v in explicit.items() if v is not None]
    if given and len(given) < len(explicit):
        missing = [f"train.cluster.{f} (or {ENVIRONMENT[f]})" for f, v in explicit.items() if v is None]
        raise ConfigError(f"train.cluster: expected coordinator_address, num_processes and process_id together "
                          f"(or none, to detect the cluster), received {', '.join(given)} without {', '.join(missing)}")
    if explicit["process_id"] is not None and not 0 <= explicit["process_id"] < explicit["num_processes"]:
        raise ConfigError(f"train.cluster.process_id: expected 0 <= process_id < num_processes="
                          f"{explicit['num_processes']}, received {explicit['process_id']}")
    jax.distributed.initialize(**explicit, initialization_timeout=cluster.initialization_timeout_s,
                               heartbeat_timeout_seconds=cluster.heartbeat_timeout_s,
                               shutdown_timeout_seconds=cluster.heartbeat_timeout_s)


def is_main() -> bool:
    """Process 0 writes what a run writes once: metrics, plots, evaluation tables, the resolved config."""
    return jax.process_index() == 0


def _digest(value) -> int:
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "little", signed=True)


def check_same_config(config: RunConfig) -> None:
    """Every process must run the same config (apart from its own place in the cluster): refused at start,
    naming each key where a process differs from process 0."""
    if jax.process_count() == 1:
        return
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(f"{name}.", value)
            elif name != "train.cluster.process_id":
                flat[name] = value

    walk("", yaml.safe_load(dump_config(config)))
    names = sorted(flat)
    digests = np.asarray([_digest(names)] + [_digest(flat[n]) for n in names], np.int64)
    every = np.asarray(multihost_utils.process_allgather(digests))  # [processes, 1 + keys]
    if (every[:, 0] != every[0, 0]).any():
        raise ConfigError("config: the processes run configs with different keys (different versions of the "
                          "code?)")
    differ = [f"{names[k]} (process {p})" for p in range(len(every)) for k in np.flatnonzero(every[p, 1:] !=
                                                                                             every[0, 1:])]
    if differ:
        raise ConfigError(f"config: every process must run the same config; differs from process 0's: "
                          f"{', '.join(differ[:8])}" + (" ..." if len(differ) > 8 else ""))


@contextlib.contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".prepare.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def once_then_everyone(directory: str | Path, build):
    """``build()`` in process 0 first, then in the others, which find its results (on a shared file system) or
    build their own copy (on a disk of their host), one process at a time per directory: no process reads a
    half-built corpus, tokenizer or token cache. Returns this process's ``build()``."""
    directory = Path(directory)
    if jax.process_count() == 1:
        return build()
    result = None
    if is_main():
        with _locked(directory):
            result = build()
    multihost_utils.sync_global_devices("sparsek prepared data (process 0)")
    if not is_main():
        with _locked(directory):
            result = build()
    multihost_utils.sync_global_devices("sparsek prepared data (every process)")
    return result


def gather(tree):
    """The global value of every array in ``tree`` on this host, as NumPy (process-local arrays as they are)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def preemption_agreed(step: int) -> bool:
    """Whether every process stops after ``step``: JAX's preemption service (SIGTERM to any process) makes them
    all answer True at the same step, so they save one consistent checkpoint."""
    return multihost_utils.reached_preemption_sync_point(step)



def replica_mismatches(state) -> list[str]:
    """The parameters whose copies disagree: every shard held by more than one device (on any process) must
    be the same array everywhere. Compared by checksums (a sum and a sum of squares per shard, float64), so
    only two numbers per shard cross between processes."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    names, keys, sums = [], [], []
    for path, leaf in flat:
        if not isinstance(leaf, jax.Array):
            continue
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for shard in leaf.addressable_shards:
            data = np.asarray(shard.data, np.float64)  # on the host: outside any mesh the caller holds
            names.append(name)
            keys.append(repr(tuple((s.start, s.stop) for s in shard.index)))
            sums.append((data.sum(), (data * data).sum()))
    local = np.asarray(sums, np.float64).reshape(-1, 2)
    key_ids = np.asarray([_digest((n, k)) for n, k in zip(names, keys)], np.int64)
    if jax.process_count() > 1:  # every process holds the same number of shards of every parameter
        local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2)
        key_ids = np.asarray(multihost_utils.process_allgather(key_ids)).reshape(-1)
        names = names * jax.process_count()
    first: dict[int, np.ndarray] = {}
    bad = []
    for name, key, value in zip(names, key_ids, local):
        reference = first.setdefault(int(key), value)
        if not np.array_equal(reference, value) and name not in bad:
            bad.append(name)
    return bad
