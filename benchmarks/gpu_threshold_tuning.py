"""Launch parameters and chunk size of the thresholds' GPU kernels, and a per-kernel profile of one of them.

    python -m benchmarks.gpu_threshold_tuning --seq 65536 --variants 256,8,4,4 128,8,4,4
    python -m benchmarks.gpu_threshold_tuning --profile 256,8,4,4     # device time per kernel

A variant is ``chunk,lanes_per_program,cut_state_warps,scan_warps`` (the fields of
``sparsek_kernels.thresholds_pallas.Launch`` after the chunk). 12 heads, batch x seq = 65,536 scores, topk = window =
1024, the scores of ``benchmarks.gpu_attention.make_inputs``; each variant: compile time and the median of 10 calls of
``blocked_thresholds`` (anchors included). ``--profile`` traces 5 calls of one variant with ``jax.profiler``
and sums the device time of every kernel (Triton kernels by their ``pallas_call`` name, XLA fusions by
theirs). Peak device memory is the process's so far. Writes benchmarks/results/gpu_threshold_tuning.json.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks import reporting
from benchmarks.gpu_attention import make_inputs, time_ms
from sparsek_jax import thresholds
from sparsek_kernels.thresholds_pallas import Launch


def parse_variant(text: str) -> tuple[int, Launch]:
    chunk, lanes, cut_warps, scan_warps = (int(x) for x in text.split(","))
    return chunk, Launch(lanes_per_program=lanes, cut_state_warps=cut_warps, scan_warps=scan_warps)


def threshold_fn(seq: int, topk: int, window: int, chunk: int, launch: Launch, interpret: bool):
    return jax.jit(functools.partial(
        thresholds.blocked_thresholds, topk=topk, window=window, buffer_size=thresholds.default_buffer_size(topk, seq),
        block_size=64, scan_block=chunk, implementation="pallas_gpu", interpret=interpret, launch=launch))


def device_time_by_kernel(trace_dir: Path, calls: int) -> list[dict]:
    """Device time per kernel name (ms per call) from the Perfetto trace that ``jax.profiler`` wrote."""
    [path] = trace_dir.rglob("perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(path.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    # A device's process also has summary lines ("XLA Modules", "XLA Ops") over the same time: count the
    # streams' kernel activity only.
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in device_pids}
    streams = {key for key, name in threads.items() if name.lower().startswith("stream")} or None
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        on_stream = streams is None or (e.get("pid"), e.get("tid")) in streams
        if e.get("ph") == "X" and e.get("pid") in device_pids and on_stream and "dur" in e:
            totals[e["name"]] += e["dur"] / 1e3
            counts[e["name"]] += 1
    return [{"kernel": name, "ms_per_call": ms / calls, "launches_per_call": counts[name] / calls}
            for name, ms in totals.most_common()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--variants", nargs="*", default=["256,8,4,4"])
    parser.add_argument("--profile", default=None, help="a variant to trace")
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (a smoke test on CPU)")
    args = parser.parse_args(argv)
    *_, u = make_inputs(args.seq, 12, 12, 64, tokens=args.seq if args.interpret else None)
    segments = jnp.zeros(u.shape[:2], jnp.int32)
    rows, profile = [], None
    for variant in args.variants:
        chunk, launch = parse_variant(variant)
        fn = threshold_fn(args.seq, args.topk, args.window, chunk, launch, args.interpret)
        start = time.perf_counter()
        fn.lower(u, segments).compile()
        row = {"variant": variant, "seq": args.seq, "compile_s": time.perf_counter() - start,
               "total_ms": time_ms(fn, u, segments, repeats=10)}
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:  # of the whole process so far (inputs included)
            row["peak_gb"] = stats["peak_bytes_in_use"] / 2**30
        print(row, flush=True)
        rows.append(row)
        reporting.write_json("gpu_threshold_tuning", vars(args), rows)
    if args.profile:
        chunk, launch = parse_variant(args.profile)
        fn = threshold_fn(args.seq, args.topk, args.window, chunk, launch, args.interpret)
        jax.block_until_ready(fn(u, segments))
        calls = 5
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(calls):
                    jax.block_until_ready(fn(u, segments))
            profile = device_time_by_kernel(Path(trace_dir), calls)
        total = sum(p["ms_per_call"] for p in profile)
        print(f"device time per call: {total:.3f} ms")
        for p in profile[:30]:
            print(f"{p['ms_per_call']:8.3f} ms  x{p['launches_per_call']:5.1f}  {p['kernel']}")
        rows.append({"variant": args.profile, "seq": args.seq, "profile_device_ms": total, "profile": profile})
        reporting.write_json("gpu_threshold_tuning", vars(args), rows)


if __name__ == "__main__":
    main()
