"""``sparsek-launch --processes N [--cpu-devices D] CONFIG [key.sub=value ...]``: a multi-process training run
on one machine, as a cluster would start it: N ``sparsek-train`` processes joined through JAX's distributed
runtime (``train.distributed=true``, a coordinator on a free local port).

Signals reach every process: Ctrl-C or SIGTERM makes them save one consistent checkpoint and stop (a second
one kills them). If a process fails, the others are stopped and the launcher exits with its status.
``--cpu-devices D`` gives each process D CPU devices (to try a mesh without accelerators); on a machine with
GPUs, ``--gpus-per-process G`` gives process i the GPUs ``i G .. i G + G - 1``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_environment(index: int, count: int, port: int, *, cpu_devices: int | None,
                        gpus_per_process: int | None) -> dict[str, str]:
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
               JAX_PROCESS_ID=str(index))
    if cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    if gpus_per_process:
        env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(index * gpus_per_process + g) for g in range(gpus_per_process))
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparsek-launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, required=True, help="number of training processes")
    parser.add_argument("--cpu-devices", type=int, help="CPU devices per process (no accelerator needed)")
    parser.add_argument("--gpus-per-process", type=int, help="GPUs per process (process i: GPUs i*G ..)")
    parser.add_argument("--grace", type=float, default=60.0,
                        help="seconds the others get to stop after one fails, before they are killed")
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, the same for every process")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes: expected a positive int, received {args.processes}")
    port = free_port()
    command = [sys.executable, "-m", "sparsek_train.trainer", args.config, *args.overrides, "train.distributed=true"]
    children = [subprocess.Popen(command, env=process_environment(i, args.processes, port,
                                                                  cpu_devices=args.cpu_devices,
                                                                  gpus_per_process=args.gpus_per_process))
                for i in range(args.processes)]
    signals_seen = []

    def forward(signum, frame):
        signals_seen.append(signum)
        for child in children:
            if child.poll() is None:  # the first signal asks for a checkpoint, the next one kills
                child.send_signal(signal.SIGTERM if len(signals_seen) == 1 else signal.SIGKILL)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _supervise(children, args.grace)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _supervise(children: list[subprocess.Popen], grace: float) -> int:
    """Waits for every process; when one fails, stops the others (SIGTERM, then SIGKILL after ``grace``)."""
    while True:
        codes = [child.poll() for child in children]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            index, code = failed[0]
            print(f"sparsek-launch: process {index} exited with status {code}; stopping the others",
                  file=sys.stderr, flush=True)
            deadline = time.monotonic() + grace
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            return code if code > 0 else 1
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
