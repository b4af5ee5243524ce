"""Training across processes on JAX's distributed runtime, with real processes on this machine (CPU devices,
collectives through gloo): the same losses as one process, resumes across process counts, preemption,
a process that dies, configs that differ. Ports come from the OS; every wait is bounded.

The model here uses dense attention: how arrays cross processes does not depend on the attention kind, and
SparseK layers under every mesh layout (their per-shard attention, losses against one device) are tested in
test_train.py on 8 devices of one process, where they compile once; here each launch compiles anew, and a dense
model compiles in half the time of a SparseK one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from builders import cpu_devices_env, write_text_corpus

from sparsek_train.launch import free_port

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=8",
        "model.mlp_dim=48", "model.attention=dense", "data.vocab_size=300", "data.seq_len=32",
        "data.batch_size=8", "data.eval_seq_len=64", "data.eval_batch_size=4", "train.log_every=1",
        "train.learning_rate=0.01", "train.eval_every=0", "train.eval_batches=1", "train.async_checkpoints=false",
        "train.cluster.heartbeat_timeout_s=5",
        # A constant learning rate: runs of different lengths share their first steps' schedule, so a run
        # stopped early and resumed can be compared with one that went straight through.
        "train.warmup_steps=0", "train.min_learning_rate_ratio=1"]


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    root = write_text_corpus(tmp_path_factory.mktemp("texts"), 16, 300)
    data = tmp_path_factory.mktemp("data")
    return TINY + ["data.dataset=text_files", f"data.source_path={root}", f"data.data_dir={data}"]


def launch(processes: int, run_dir, overrides, *extra, timeout=600, wait=True):
    command = [sys.executable, "-m", "sparsek_train.launch", "--processes", str(processes), "--cpu-devices",
               str(4 // processes), "--grace", "30", str(ROOT / "configs/demo.yaml"), *overrides,
               f"train.run_dir={run_dir}", *extra]
    if processes == 1:  # one process, four devices, no distributed runtime: the reference
        env = cpu_devices_env(4)
        command = [sys.executable, "-m", "sparsek_train.trainer", str(ROOT / "configs/demo.yaml"), *overrides,
                   f"train.run_dir={run_dir}", *extra]
    else:
        env = dict(os.environ)
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=env, start_new_session=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_losses(got, want, steps):
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=2e-4,
                               err_msg=f"steps {list(steps)}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, overrides) -> dict[int, float]:
    """The losses of one process with four devices, uninterrupted: what every multi-process run must give (a
    constant learning rate makes any prefix of it the run of that length)."""
    run_dir = tmp_path_factory.mktemp("reference")
    launch(1, run_dir, overrides, *DATA_FSDP, f"train.steps={REFERENCE_STEPS}")
    return losses(run_dir)


DATA_FSDP = ("train.mesh.data=2", "train.mesh.fsdp=2")
DATA_TENSOR = ("train.mesh.data=2", "train.mesh.tensor=2")
REFERENCE_STEPS = 40


def test_two_processes_train_like_one_and_resume_with_one(tmp_path, overrides, reference):
    two = tmp_path / "two"
    done = launch(2, two, overrides, *DATA_FSDP, "train.steps=4", "train.checkpoint_every=4")
    assert done.stdout.count('"step": 4') == 1  # process 0 reports for the run
    assert_same_losses(losses(two), reference, range(1, 5))
    # The checkpoint of two processes resumes in one (four devices, same mesh): same data order, same losses.
    launch(1, two, overrides, *DATA_FSDP, "train.steps=6")
    assert_same_losses(losses(two), reference, range(1, 7))


def test_sigterm_stops_every_process_at_one_step_and_the_run_resumes(tmp_path, overrides, reference):
    # Tensor parallelism across the two processes (the reference is data x fsdp): the same losses.
    run_dir = tmp_path / "run"
    process = launch(2, run_dir, overrides, *DATA_TENSOR, "train.steps=100000", "train.checkpoint_every=100000",
                     wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}) < 3:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)  # the launcher passes it on to both processes
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1, saved  # one consistent checkpoint, whichever process saw the signal first
    assert "stopped by signal" in out
    stop = saved[0]
    assert stop + 2 <= REFERENCE_STEPS, stop
    launch(2, run_dir, overrides, *DATA_TENSOR, f"train.steps={stop + 2}")
    assert_same_losses(losses(run_dir), reference, range(1, stop + 3))


def test_a_dead_process_stops_the_run_within_the_heartbeat(tmp_path, overrides):
    run_dir = tmp_path / "run"
    # The mesh of the first test, whose compiled step this run can then read from the compilation cache.
    process = launch(2, run_dir, overrides, *DATA_FSDP, "train.steps=100000", "train.checkpoint_every=100000",
                     wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run_dir / "metrics.jsonl").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.5)
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    killed = time.monotonic()
    os.kill(int(children[1]), signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    elapsed = time.monotonic() - killed
    assert process.returncode != 0
    assert "sparsek-launch: process 1 exited with status -9; stopping the others" in err
    assert elapsed < 45, elapsed  # the heartbeat (5 s here) or the launcher ends the other process


def test_processes_with_different_configs_refuse_to_start(tmp_path, overrides):
    port = free_port()
    processes = []
    for index, rate in enumerate(("0.01", "0.02")):
        env = cpu_devices_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                              JAX_PROCESS_ID=str(index))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "sparsek_train.trainer", str(ROOT / "configs/demo.yaml"), *overrides,
             f"train.run_dir={tmp_path / 'run'}", "train.distributed=true", f"train.learning_rate={rate}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env))
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 2, err[-3000:]
        assert "differs from process 0's: train.learning_rate (process 1)" in err


def test_replica_check_finds_copies_that_differ():
    script = r"""
import jax, jax.numpy as jnp, numpy as np
from sparsek_train.distributed import replica_mismatches
devices = jax.devices()
sharding = jax.sharding.NamedSharding(jax.make_mesh((2,), ("x",)), jax.sharding.PartitionSpec())
same = jax.device_put(np.ones(3, np.float32), sharding)
copies = [jax.device_put(np.full(3, v, np.float32), d) for v, d in zip((1.0, 2.0), devices)]
differ = jax.make_array_from_single_device_arrays((3,), sharding, copies)
print(replica_mismatches({"same": same, "differ": differ}))
"""
    env = cpu_devices_env(2)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "['differ']"
