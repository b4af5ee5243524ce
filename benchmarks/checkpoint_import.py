"""Importing a real-size Hugging Face checkpoint: peak resident memory and time, on one CPU device and on a
fake 8-device CPU mesh, and the export back.

    python -m benchmarks.checkpoint_import                    # the current code
    python -m benchmarks.checkpoint_import --before 9d7a741   # also the import path of that commit

A synthetic checkpoint with the exact tensor names and shapes of Llama-3.2-1B (random bfloat16 weights, tied
embeddings, 1.24 B parameters, 2.47 GB) is written with the ``safetensors`` package into shards of at most
``--shard-size`` bytes plus the index, in a temporary directory (``--workdir``, default /tmp) that is deleted
afterwards. Every measurement runs in a fresh subprocess, one at a time: ``baseline`` is its resident memory
after importing jax and the library (VmRSS), ``peak`` its high-water mark (VmHWM) after the import, so
``(peak - baseline) / checkpoint`` is the import's memory bill in checkpoints (goal: at most 1.3 with
``param_dtype="bfloat16"``, where the model itself is one checkpoint's worth).

Scenarios: ``from_pretrained`` on one device, reading into bfloat16 and into float32 (the ``ModelConfig``
default: the model alone is then two checkpoints' worth); on 8 devices (mesh data 1 x fsdp 4 x tensor 2, the
training app's logical axis rules) ``from_pretrained(mesh=...)``, and the training app's ``train.init_from``
path (``huggingface.pretrained_model`` with the run's model config, as ``sparsek_train.initial_weights`` calls it;
before this change: the model created sharded, initialised, then
``load_pretrained_weights``). On the mesh every live array's shards are checked: each
device holds exactly its slice of each parameter (``per-device MiB`` against the slices' total). The export
(``save_pretrained`` into 1 GB shards, after a 1-device bfloat16 import) is timed with its own peak, and
every exported tensor is compared bit for bit with the original, read back with the ``safetensors`` package.

``--before REV`` measures ``sparsek_jax/nn/huggingface.py`` of commit REV (``git show``) in the same way,
except ``from_pretrained`` on the mesh, which it did not offer (its documentation gave the training app's
path). Writes benchmarks/results/checkpoint_import_cpu.json.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Llama-3.2-1B's config.json (the architecture fields).
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "hidden_act": "silu", "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}
MESH = {"data": 1, "fsdp": 4, "tensor": 2}
SCENARIOS = {  # name -> (devices, param_dtype, how)
    "1 device, bfloat16": (1, "bfloat16", "from_pretrained"),
    "1 device, float32": (1, "float32", "from_pretrained"),
    "8 devices, bfloat16": (8, "bfloat16", "from_pretrained"),
    "8 devices, bfloat16, training app's path": (8, "bfloat16", "train.init_from"),
}
EXPORT_SHARD_SIZE = 10**9


def hf_tensor_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """The tensors of a Llama checkpoint (``nn.Linear`` weights ``[out, in]``), in the layout's order."""
    d, heads, kv, head_dim, mlp = (hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
                                   hf["head_dim"], hf["intermediate_size"])
    shapes = {"model.embed_tokens.weight": (hf["vocab_size"], d)}
    for i in range(hf["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes.update({
            layer + "self_attn.q_proj.weight": (heads * head_dim, d), layer + "self_attn.k_proj.weight": (kv * head_dim, d),
            layer + "self_attn.v_proj.weight": (kv * head_dim, d), layer + "self_attn.o_proj.weight": (d, heads * head_dim),
            layer + "mlp.gate_proj.weight": (mlp, d), layer + "mlp.up_proj.weight": (mlp, d),
            layer + "mlp.down_proj.weight": (d, mlp), layer + "input_layernorm.weight": (d,),
            layer + "post_attention_layernorm.weight": (d,)})
    shapes["model.norm.weight"] = (d,)
    if not hf["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (hf["vocab_size"], d)
    return shapes


def write_synthetic_checkpoint(path: Path, hf: dict, shard_size: int, seed: int = 0) -> int:
    """Random bfloat16 tensors (normal, std 0.02) of ``hf``'s shapes in shards of at most ``shard_size`` bytes
    with the index, written with the ``safetensors`` package; returns the bytes on disk."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    shards, size = [[]], 0
    for name, shape in hf_tensor_shapes(hf).items():
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    path.mkdir(parents=True)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
                   for name, shape in shard}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
    total = sum(int(np.prod(s)) * 2 for s in hf_tensor_shapes(hf).values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


# -- one measurement, in its own process -------------------------------------------------------------------

def memory_kib() -> dict[str, int]:
    """This process's VmRSS and VmHWM (peak), KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def reset_peak() -> None:
    """Restarts VmHWM from the current resident memory (Linux: ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def load_module(source: str | None):
    """The ``huggingface`` module: the current one, or the file ``source`` (a past version)."""
    if source is None:
        from sparsek_jax.nn import huggingface
        return huggingface
    spec = importlib.util.spec_from_file_location("huggingface_before", source)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def shard_report(arrays) -> dict:
    """Whether every array's every shard has the shape its sharding gives that device, and the bytes each
    device holds against the total of the slices it should hold."""
    held, expected, exact = collections.Counter(), collections.Counter(), True
    for array in arrays:
        want = array.sharding.shard_shape(array.shape)
        for shard in array.addressable_shards:
            exact &= tuple(shard.data.shape) == tuple(want)
            held[shard.device.id] += shard.data.nbytes
            expected[shard.device.id] += array.dtype.itemsize * math.prod(want)
    return {"devices": len(held), "shards_exact": bool(exact and held == expected),
            "per_device_mib_max": max(held.values()) / 2**20, "per_device_mib_min": min(held.values()) / 2**20,
            "per_device_expected_mib_max": max(expected.values()) / 2**20}


def weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> file of a checkpoint directory (its index, or its one file)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(str(path / "model.safetensors"), "np") as f:
        return {name: "model.safetensors" for name in f.keys()}


def measure(args) -> dict:
    import jax
    from flax import nnx

    module = load_module(args.module)
    devices, param_dtype, how = SCENARIOS[args.scenario]
    jax.devices()
    mesh = None
    if devices > 1:
        from sparsek_jax.nn.sharding import activate

        mesh = jax.make_mesh(tuple(MESH.values()), tuple(MESH), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    baseline = memory_kib()["VmRSS"]
    start = time.perf_counter()
    if how == "from_pretrained" and mesh is None:
        model = module.from_pretrained(args.checkpoint, param_dtype=param_dtype)
    elif how == "from_pretrained":
        with activate(mesh):
            model = module.from_pretrained(args.checkpoint, mesh=mesh, param_dtype=param_dtype)
    elif args.module is None:  # the training app's train.init_from: the model of its config built from the files
        config = module.model_config_from_pretrained(args.checkpoint, param_dtype=param_dtype)
        with activate(mesh):
            model = module.pretrained_model(config, args.checkpoint, mesh=mesh)
    else:  # how the training app did it before: the model created sharded (initialised), then filled
        from sparsek_jax.nn import TransformerLM
        from sparsek_jax.nn.sharding import create_sharded

        config = module.model_config_from_pretrained(args.checkpoint, param_dtype=param_dtype)
        model = create_sharded(mesh, lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
        with activate(mesh):
            module.load_pretrained_weights(model, args.checkpoint)
    arrays = [v.get_value() for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)]
    jax.block_until_ready(arrays)
    row = {"import_s": time.perf_counter() - start, "baseline_mib": baseline / 1024,
           "peak_mib": memory_kib()["VmHWM"] / 1024, "model_mib": sum(a.nbytes for a in arrays) / 2**20}
    if mesh is not None:
        row.update(shard_report(jax.live_arrays()))
    if args.export:
        from safetensors import safe_open

        reset_peak()
        before_export = memory_kib()["VmRSS"]
        start = time.perf_counter()
        module.save_pretrained(model, args.export, max_shard_size=EXPORT_SHARD_SIZE)
        row.update(export_s=time.perf_counter() - start,
                   export_peak_over_model_mib=(memory_kib()["VmHWM"] - before_export) / 1024,
                   export_files=len(list(Path(args.export).glob("*.safetensors"))))
        del model, arrays
        original, exported = weight_map(Path(args.checkpoint)), weight_map(Path(args.export))
        same = sorted(original) == sorted(exported)
        for name in original if same else ():
            with safe_open(str(Path(args.checkpoint) / original[name]), "np") as a, \
                    safe_open(str(Path(args.export) / exported[name]), "np") as b:
                x, y = a.get_tensor(name), b.get_tensor(name)
                same &= x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        row["export_bit_exact"] = bool(same)
    return row


def run_measurement(scenario: str, checkpoint: Path, module: str | None, export: Path | None) -> dict:
    devices = SCENARIOS[scenario][0]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if devices > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    command = [sys.executable, "-m", "benchmarks.checkpoint_import", "--measure", scenario,
               "--checkpoint", str(checkpoint)] + (["--module", module] if module else []) + (
        ["--export", str(export)] if export else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if done.returncode:
        raise RuntimeError(f"{scenario}: the measurement failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", help="also measure the import path of this git revision")
    parser.add_argument("--shard-size", type=int, default=10**9, help="bytes per synthetic checkpoint shard")
    parser.add_argument("--workdir", default="/tmp", help="where the synthetic checkpoint is written (and deleted)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--measure", choices=list(SCENARIOS), help=argparse.SUPPRESS)  # one measurement (subprocess)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--module", help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        args.scenario = args.measure
        print(json.dumps(measure(args)))
        return

    from benchmarks import reporting

    work = Path(tempfile.mkdtemp(prefix="checkpoint_import.", dir=args.workdir))
    try:
        checkpoint = work / "llama-3.2-1b-synthetic"
        start = time.perf_counter()
        size = write_synthetic_checkpoint(checkpoint, LLAMA_3_2_1B, args.shard_size)
        files = len(list(checkpoint.glob("*.safetensors")))
        print(f"synthetic checkpoint: {size / 2**20:.0f} MiB in {files} shards ({time.perf_counter() - start:.0f} s)")
        codes = [("after", None)]
        if args.before:
            before = work / "huggingface_before.py"
            before.write_text(subprocess.run(["git", "show", f"{args.before}:sparsek_jax/nn/huggingface.py"],
                                             capture_output=True, text=True, check=True,
                                             cwd=Path(__file__).parent.parent).stdout)
            codes.insert(0, ("before", str(before)))
        rows = []
        for scenario in args.scenarios:
            for code, module in codes:
                if code == "before" and SCENARIOS[scenario][0] > 1 and SCENARIOS[scenario][2] == "from_pretrained":
                    continue  # from_pretrained took no mesh: the training app's path row is how it was done
                export = work / "exported" if code == "after" and scenario == "1 device, bfloat16" else None
                row = {"scenario": scenario, "code": code, **run_measurement(scenario, checkpoint, module, export)}
                row["checkpoint_mib"] = size / 2**20
                row["bill"] = (row["peak_mib"] - row["baseline_mib"]) / row["checkpoint_mib"]
                rows.append(row)
                print(json.dumps(row), flush=True)
                if export is not None:
                    shutil.rmtree(export)
    finally:
        shutil.rmtree(work)
    config = {"checkpoint": "Llama-3.2-1B shapes, random bfloat16", "hf_config": LLAMA_3_2_1B,
              "checkpoint_bytes": size, "checkpoint_files": files, "mesh": MESH, "before": args.before,
              "export_shard_size": EXPORT_SHARD_SIZE}
    reporting.publish("checkpoint_import_cpu", config, rows, columns=[
        ("scenario", "scenario", "s"), ("code", "code", "s"), ("import_s", "import s", ".1f"),
        ("baseline_mib", "baseline MiB", ".0f"), ("peak_mib", "peak MiB", ".0f"),
        ("bill", "(peak - baseline) / checkpoint", ".2f"), ("model_mib", "model MiB", ".0f"),
        ("per_device_mib_max", "per-device MiB (max)", ".0f"),
        ("per_device_expected_mib_max", "its slices MiB", ".0f"), ("shards_exact", "shards exact", "")])


if __name__ == "__main__":
    main()
