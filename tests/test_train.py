"""The training app end to end on CPU: configs, train/checkpoint/resume/eval, exact resume, sharding on 8
fake devices, signals and bad configs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from builders import cpu_devices_env, two_training_steps, write_text_corpus

from sparsek_jax.nn import TransformerLM
from sparsek_train.config import ConfigError, load_config
from sparsek_train import app, evaluate, generate_cli, plot
from sparsek_train.trainer import train

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TINY_MODEL = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
              "model.head_dim=8", "model.mlp_dim=48", "model.topk=4", "model.window=4", "model.block_sizes.block_q=8",
              "model.buffer_size=16", "model.scan_layers=false", "model.remat=none", "model.dtype=float32"]


def tiny_model_config(path):
    return load_config(path, TINY_MODEL + ["model.implementation=xla"]).model_config(vocab_size=97)


STRUCTURE = ("layer_kinds", "gate", "tie_embeddings", "scale_embeddings", "qkv_bias", "out_bias", "rope_scaling",
             "param_dtype", "dense_implementation")


def distinct_tiny_models():
    """The shipped configs' models shrunk to TINY_MODEL, one per distinct structure (the fields that decide
    what is built and run; most configs share one)."""
    models = {}
    for path in CONFIGS:
        try:
            config = tiny_model_config(path)
        except ConfigError:
            continue  # test_every_config_loads names it
        key = tuple(getattr(config, name) for name in STRUCTURE)
        models.setdefault(key, (config, []))[1].append(str(path.relative_to(ROOT / "configs")))
    return list(models.values())


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_loads(path):
    assert tiny_model_config(path).num_layers == 2


TINY_MODELS = distinct_tiny_models()


@pytest.mark.parametrize("model_config, paths", TINY_MODELS, ids=[f"{p[0]}+{len(p) - 1}" for _, p in TINY_MODELS])
def test_every_configs_model_builds_and_runs(model_config, paths):
    model = TransformerLM(model_config, rngs=nnx.Rngs(0))
    logits = nnx.jit(lambda m, t: m(t))(model, jnp.zeros((1, 16), jnp.int32))
    assert logits.shape == (1, 16, 97) and bool(jnp.isfinite(logits).all()), paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("texts"), 16, 300)


@pytest.fixture(scope="module")
def data_dir(corpus, tmp_path_factory):
    """One corpus build, tokenizer and token cache for the module's runs (each run has its own run dir)."""
    return tmp_path_factory.mktemp("data")


def run_overrides(corpus, data_dir, run_dir, **extra):
    """The training app's runs: one layer (what a run does with its layers does not depend on how many there are:
    the model tests stack several, test_distributed.py trains and resumes two), a tiny corpus, ``extra``."""
    values = {"model.num_layers": 1, "data.dataset": "text_files", "data.source_path": str(corpus),
              "data.data_dir": str(data_dir), "data.vocab_size": 300, "data.seq_len": 32, "data.batch_size": 4,
              "data.eval_seq_len": 64, "data.eval_batch_size": 2, "train.run_dir": str(run_dir), "train.log_every": 1,
              "train.warmup_steps": 2, "train.learning_rate": 0.01, "train.eval_batches": 1,
              "train.async_checkpoints": "false", "model.implementation": "xla"}
    values.update(extra)
    return TINY_MODEL + [f"{k}={v}" for k, v in values.items()]


def losses(run_dir):
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_train_checkpoint_resume_eval(corpus, tmp_path, data_dir, capsys):
    run_dir = tmp_path / "run"
    config = load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, run_dir, **{
        "train.steps": 3, "train.checkpoint_every": 2}))
    summary = train(config, log=lambda m: None, show_progress=False)
    assert summary["step"] == 3 and not summary["interrupted"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert "eval_loss" in records[-1] and records[-1]["step"] == 3
    assert records[0]["step"] == 0 and "eval_loss" in records[0]  # the untrained model, evaluated first
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert load_config(run_dir / "config.yaml") == config  # the resolved config is saved with the run
    # Resume to step 5 from the newest checkpoint.
    more = load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, run_dir, **{"train.steps": 5}))
    assert train(more, log=lambda m: None, show_progress=False)["step"] == 5
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5]
    evaluations = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if "eval_loss" in json.loads(line)]
    assert evaluations == [0, 3, 5]  # a resumed run does not evaluate its start again
    # Evaluate the checkpoint: JSON by position bucket, beyond the training context. The command-line entry
    # points are called in this process (their console scripts only call them).
    capsys.readouterr()
    assert evaluate.main([str(ROOT / "configs/demo.yaml"), *run_overrides(corpus, data_dir, run_dir),
                          f"checkpoint={run_dir}", "eval.lengths=[32, 64]", "eval.batch_size=2"]) == 0
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["checkpoint_step"] == 5
    assert [r["length"] for r in report["results"]] == [32, 64]
    for r in report["results"]:
        assert r["tokens"] > 0 and r["bits_per_byte"] > 0 and np.isfinite(r["perplexity"])
        assert sum(b["tokens"] for b in r["buckets"]) == r["tokens"]
    assert "(beyond training context)" in capsys.readouterr().out
    assert generate_cli.main([str(ROOT / "configs/demo.yaml"), *run_overrides(corpus, data_dir, run_dir),
                              f"checkpoint={run_dir}", "prompt=the state of", "generate.max_new_tokens=8"]) == 0
    assert capsys.readouterr().out.startswith("the state of")
    assert plot.main([str(run_dir)]) == 0 and (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resumed_run_has_the_same_losses(corpus, tmp_path, data_dir):
    straight = load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, tmp_path / "a",
                                                                    **{"train.steps": 6}))
    train(straight, log=lambda m: None, show_progress=False)
    first = load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, tmp_path / "b", **{
        "train.steps": 3, "train.checkpoint_every": 3}))
    train(first, log=lambda m: None, show_progress=False)
    second = load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, tmp_path / "b", **{
        "train.steps": 6, "train.checkpoint_every": 3}))
    train(second, log=lambda m: None, show_progress=False)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-6)


def test_the_learning_rates_are_an_argument_of_the_step_and_follow_adamw():
    # AdamW at the scheduled rate, update for update, with each parameter group's rate (the scorers' scaled,
    # the others' zero in the scorers-only phase); and one compiled update for every schedule, scorer rate and
    # phase (a resumed run trained further, a sweep), since the rates are not constants of the program.
    configs = [load_config(ROOT / "configs/demo.yaml", overrides) for overrides in (
        ["train.steps=7", "train.warmup_steps=2", "train.grad_clip=0.5", "train.scorer_learning_rate_scale=10",
         "train.scorers_only_steps=3"],
        ["train.steps=70", "train.warmup_steps=20", "train.grad_clip=0.5", "train.learning_rate=0.3"])]
    config, t = configs[0], configs[0].train
    schedule = app.learning_rate_schedule(config)
    rates = app.learning_rates(config)
    scheduled = np.asarray([float(schedule(i)) for i in range(7)], np.float32)
    group = {name: rates[:, app.RATE_GROUPS.index(name)] for name in app.RATE_GROUPS}
    np.testing.assert_allclose(group["norms"], scheduled, rtol=1e-6)
    np.testing.assert_allclose(group["scorers"], 10 * scheduled, rtol=1e-6)
    np.testing.assert_array_equal(group["other"], np.where(np.arange(7) < 3, 0, group["norms"]))
    assert scheduled[0] == 0 and scheduled[2] == pytest.approx(t.learning_rate)
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.ones((4,)),
              "scorer": {"w_score": jnp.linspace(0, 1, 4)}, "final_norm": jnp.full((4,), 2.0)}
    grads = {"w": jnp.linspace(0.5, -2, 12).reshape(3, 4), "b": jnp.full((4,), -0.2),
             "scorer": {"w_score": jnp.full((4,), 0.3)}, "final_norm": jnp.full((4,), -0.1)}
    adamw = optax.chain(optax.clip_by_global_norm(t.grad_clip), optax.adamw(
        1.0, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay, mask=jax.tree.map(lambda p: p.ndim >= 2, params)))
    ours = app.optimizer_transform(config)
    state, expected_state = ours.init(params), adamw.init(params)
    for step in range(4):
        updates, state = ours.update(grads, state, params, learning_rates=rates[step])
        unit, expected_state = adamw.update(grads, expected_state, params)
        expected = {"w": unit["w"] * group["other"][step], "b": unit["b"] * group["other"][step],
                    "scorer": {"w_score": unit["scorer"]["w_score"] * group["scorers"][step]},
                    "final_norm": unit["final_norm"] * group["norms"][step]}
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), updates, expected)
        params = optax.apply_updates(params, updates)
    lowered = [jax.jit(lambda g, s, p, lr, tx=app.optimizer_transform(c): tx.update(g, s, p, learning_rates=lr))
               .lower(grads, state, params, rates[1]).as_text() for c in configs]
    assert lowered[0] == lowered[1]


# Two steps on eight CPU devices need a process of their own (the device count is fixed when jax starts).
SHARDED_SCRIPT = ("import json, sys\nfrom builders import two_training_steps\n"
                  "print(json.dumps(two_training_steps(sys.argv[1:])))")


@pytest.fixture(scope="module")
def one_device_losses(corpus, data_dir, tmp_path_factory):
    """The reference of the sharded runs: one device, the XLA path, one layer, in this process."""
    run_dir = tmp_path_factory.mktemp("one-device")
    return two_training_steps([str(ROOT / "configs/demo.yaml"), *run_overrides(corpus, data_dir, run_dir)],
                              with_hlo=False)["losses"]


@pytest.mark.parametrize("kernels", ["xla", "pallas_gpu_interpret"])
def test_train_step_on_8_fake_devices_with_a_2x2x2_mesh(corpus, tmp_path, kernels, data_dir, one_device_losses):
    overrides = run_overrides(corpus, data_dir, tmp_path / "run")
    if kernels == "pallas_gpu_interpret":  # of the sharded run; the reference runs the XLA path
        overrides += ["model.implementation=pallas_gpu", "model.interpret=true"]
    mesh = ["train.mesh.data=2", "train.mesh.fsdp=2", "train.mesh.tensor=2"]  # 4 sequences: one per (data, fsdp)
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(ROOT / "configs/demo.yaml"), *overrides, *mesh],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env=cpu_devices_env(8, PYTHONPATH=os.pathsep.join(
                                filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))))
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(result.stdout.strip().splitlines()[-1])
    assert sharded["devices"] == 8 and sharded["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    # Parameters sharded as their logical axes declare (embed->fsdp, heads/mlp/vocab->tensor); batches over
    # data and fsdp.
    assert sharded["specs"] == {"q_proj": "P('fsdp', 'tensor')", "embed": "P('tensor', 'fsdp')",
                                "w_score": "P('fsdp', 'tensor')", "mlp_down": "P('tensor', 'fsdp')",
                                "batch": "P(('data', 'fsdp'),)"}
    # The attention runs per shard: nothing inside it is all-gathered, and no forward all-gather makes a q/k/v
    # or scores-shaped activation ([batch, 32 tokens, heads, 8] / [batch, 32, heads]) larger on any device.
    # (The backward gathers dk over the fsdp axis for the projections' weight gradients, outside the attention.)
    inside = ("thresholds", "build_tiles", "tile_attention", "tile_gradients", "key_gradient_sums",
              "scores_gradient", "sparsek_")
    for line in sharded["lines"]:
        shape = re.search(r"= (\w+\[[\d,]*\])", line).group(1)
        op_name = re.search(r'op_name="([^"]*)"', line).group(1)
        assert not any(name in op_name for name in inside), line[:300]
        assert "transpose(" in op_name or not re.fullmatch(r"(f32|bf16)\[\d+,32,[124](,8)?\]", shape), line[:300]
    # The kernels match the XLA path in their own tests; here they must also match it when sharded.
    np.testing.assert_allclose(sharded["losses"], one_device_losses, rtol=2e-4)


def test_sigterm_saves_a_checkpoint_and_resume_continues(corpus, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    overrides = run_overrides(corpus, data_dir, run_dir, **{"train.steps": 100000,
                                                                    "train.checkpoint_every": 100000})
    process = subprocess.Popen([sys.executable, "-m", "sparsek_train.trainer", str(ROOT / "configs/demo.yaml"), *overrides],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "stopped by signal" in out
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and saved[0] >= 1
    resumed = load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, run_dir, **{
        "train.steps": saved[0] + 1}))
    summary = train(resumed, log=lambda m: None, show_progress=False)
    assert summary["step"] == saved[0] + 1


def test_bad_config_exits_with_status_2_naming_the_key(capsys):
    from sparsek_train import trainer

    for argv, key in ((["train.stepz=3"], "train.stepz: unknown key"),
                      (["train.steps=many"], "train.steps: expected int, received 'many'")):
        assert trainer.main([str(ROOT / "configs/demo.yaml"), *argv]) == 2
        assert key in capsys.readouterr().err


# -- faults: nothing silently wrong, nothing lost ---------------------------------------------------------------

def quiet(config):
    messages = []
    summary = train(config, log=messages.append, show_progress=False)
    return summary, messages


def metric_steps(run_dir):
    return [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def saved_steps(run_dir):
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_divergence_stops_without_saving_over_the_last_good_checkpoint(corpus, tmp_path, capsys, mode, data_dir):
    from sparsek_train import trainer

    run_dir = tmp_path / "run"
    good = run_overrides(corpus, data_dir, run_dir, **{"train.steps": 2, "train.checkpoint_every": 1})
    quiet(load_config(ROOT / "configs/demo.yaml", good))
    # A learning rate of 1e30 sends the parameters to ~1e30 in one step; the next loss overflows.
    diverge = run_overrides(corpus, data_dir, run_dir, **{
        "train.steps": 12, "train.checkpoint_every": 1, "train.learning_rate": 1e30, "train.warmup_steps": 0,
        "train.on_nonfinite": mode, "train.max_skipped_steps": 3})
    assert trainer.main([str(ROOT / "configs/demo.yaml"), *diverge]) == 1
    err = capsys.readouterr().err
    found = re.search(r"loss or gradient norm not finite at step (\d+) \(loss \S+, grad_norm (nan|inf)\)", err)
    assert found, err
    assert ("max_skipped_steps reached" in err) == (mode == "skip")
    if mode == "stop":  # (skipped steps leave the parameters as they were, so "skip" may save them)
        assert max(saved_steps(run_dir)) < int(found.group(1)), "a checkpoint was saved after a bad step"


def test_corrupt_newest_checkpoints_fall_back_and_metrics_keep_each_step_once(corpus, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    args = lambda steps: load_config(ROOT / "configs/demo.yaml", run_overrides(
        corpus, data_dir, run_dir, **{"train.steps": steps, "train.checkpoint_every": 2,
                                               "train.keep_checkpoints": 5}))
    quiet(args(6))
    assert saved_steps(run_dir) == [2, 4, 6]
    # Damage the two newest: step 6 loses its metadata, step 4 an array file is truncated.
    (run_dir / "checkpoints" / "6" / "model" / "_METADATA").unlink()
    array_files = sorted((run_dir / "checkpoints" / "4" / "model").rglob("*"), key=lambda p: -p.stat().st_size)
    array_files[0].write_bytes(array_files[0].read_bytes()[:20])
    summary, messages = quiet(args(7))
    assert summary["step"] == 7
    assert any("checkpoint step 6" in m and "cannot be read" in m for m in messages), messages
    assert any("resumed from" in m and m.endswith("at step 2") for m in messages), messages
    assert metric_steps(run_dir) == [1, 2, 3, 4, 5, 6, 7]  # steps 3-6 were run again, and are logged once
    assert saved_steps(run_dir) == [2, 4, 6, 7] and (run_dir / "checkpoints" / "unreadable-6").is_dir()


def test_failed_save_stops_with_one_message(corpus, tmp_path, capsys, monkeypatch, data_dir):
    import errno

    import orbax.checkpoint as ocp

    from sparsek_train import trainer

    def full_disk(self, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    overrides = run_overrides(corpus, data_dir, tmp_path / "run", **{"train.steps": 3,
                                                                            "train.checkpoint_every": 2})
    assert trainer.main([str(ROOT / "configs/demo.yaml"), *overrides]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert len(err) == 1 and "saving the checkpoint of step 2" in err[0] and "No space left" in err[0], err


def test_run_dir_is_locked_and_bound_to_its_model(corpus, tmp_path, data_dir):
    from sparsek_train import run_dir as run_dirs

    run_dir = tmp_path / "run"
    config = load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, run_dir,
                                                                   **{"train.steps": 2}))
    quiet(config)
    saved = (run_dir / "config.yaml").read_text()
    with run_dirs.locked(run_dir):
        with pytest.raises(ConfigError, match=rf"train.run_dir: '{run_dir}' is in use by process {os.getpid()}"):
            quiet(config)
    changed = load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, run_dir, **{
        "train.steps": 4, "model.d_model": 48}))
    with pytest.raises(ConfigError, match=r"holds checkpoints of another configuration \(model.d_model: 32 in the "
                                          r"run, 48 now\)"):
        quiet(changed)
    assert (run_dir / "config.yaml").read_text() == saved
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="train.run_dir: expected a directory, received .* which is a file"):
        quiet(load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, tmp_path / "file")))


def test_restore_names_a_mismatched_parameter(tmp_path):
    import optax

    from sparsek_train.checkpointing import CheckpointError, RunCheckpoints

    def model(d_model):
        from sparsek_jax.nn import ModelConfig

        config = ModelConfig(vocab_size=50, d_model=d_model, num_layers=1, num_heads=2, num_kv_heads=1,
                             head_dim=8, mlp_dim=16, topk=2, window=2)
        m = TransformerLM(config, rngs=nnx.Rngs(0))
        return m, nnx.Optimizer(m, optax.adamw(1e-3), wrt=nnx.Param)

    checkpoints = RunCheckpoints(tmp_path, asynchronous=False)
    checkpoints.save(1, *model(16), {}, {"step": 1}, force=True)
    checkpoints.close()
    with pytest.raises(CheckpointError, match=r"model parameter blocks/0/attention/k_proj: expected shape "
                                              r"\(24, 1, 8\), the checkpoint holds \(16, 1, 8\)"):
        RunCheckpoints(tmp_path, read_only=True).restore(1, *model(24))


def test_a_dense_run_converted_to_sparsek_trains_its_scorers_first(corpus, tmp_path, data_dir):
    from sparsek_train import app
    from sparsek_train.checkpointing import CheckpointError, RunCheckpoints

    dense_dir, converted_dir = tmp_path / "dense", tmp_path / "converted"
    quiet(load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, dense_dir, **{
        "train.steps": 2, "model.attention": "dense"})))
    # Every step trains only the scorers and norms: the projections must come out as the dense run left them.
    summary, messages = quiet(load_config(ROOT / "configs/demo.yaml", run_overrides(
        corpus, data_dir, converted_dir, **{"train.steps": 3, "train.init_from": str(dense_dir),
                                                     "train.scorers_only_steps": 3})))
    assert summary["step"] == 3
    assert any(m.startswith("weights from") and "scoring-network parameters start at their initialisation" in m
               for m in messages), messages

    def saved(run_dir, step):
        checkpoints = RunCheckpoints(run_dir / "checkpoints", read_only=True)
        try:
            meta = checkpoints.model_metadata(step)
            cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
            return {k: np.asarray(v) for k, v in checkpoints.read_model(step, {
                n: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu) for n, m in meta.items()}).items()}
        finally:
            checkpoints.close()

    before, after = saved(dense_dir, 2), saved(converted_dir, 3)
    assert sorted(set(after) - set(before)) == ["blocks/0/attention/scorer/w_score"]
    for name, value in before.items():
        if "norm" not in name:
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert any(not np.array_equal(after[n], before[n]) for n in before if "norm" in n)
    assert all(np.abs(after[n]).max() > 0 for n in after if "scorer" in n)
    # Evaluation loads the dense run into the sparsek config too (the converted model before fine-tuning) and
    # rejects a source whose parameters do not fit.
    converted = load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, converted_dir) + [
        f"checkpoint={dense_dir}"])
    session = app.load_session(converted, with_optimizer=False, log=lambda m: None)
    np.testing.assert_array_equal(np.asarray(session.model.blocks[0].attention.q_proj[...]),
                                  before["blocks/0/attention/q_proj"])
    wider = load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, converted_dir) + [
        f"checkpoint={dense_dir}", "model.mlp_dim=64"])
    with pytest.raises(CheckpointError, match=r"checkpoint: model parameter blocks/0/mlp/down: expected shape "
                                              r"\(64, 32\), the checkpoint holds \(48, 32\)"):
        app.load_session(wider, with_optimizer=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="train.init_from: expected a run directory, a checkpoint step directory or "
                                          "a Hugging Face checkpoint directory"):
        quiet(load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, tmp_path / "x", **{
            "train.init_from": str(tmp_path / "nothing")})))


def test_scorer_distillation_steps_then_sparse_attention_and_scorer_learning_rate(corpus, tmp_path, data_dir):
    from sparsek_train.checkpointing import RunCheckpoints

    def w_score(run_dir, step):
        checkpoints = RunCheckpoints(run_dir / "checkpoints", read_only=True)
        try:
            meta = checkpoints.model_metadata(step)
            cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
            values = checkpoints.read_model(step, {n: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu)
                                                   for n, m in meta.items()})
            return {n: np.asarray(v) for n, v in values.items()}
        finally:
            checkpoints.close()

    distilled = tmp_path / "distilled"
    quiet(load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, distilled, **{
        "train.steps": 3, "train.scorer_distill_steps": 2})))
    records = [json.loads(line) for line in (distilled / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert steps[1]["distill_loss"] > 0 and steps[2]["distill_loss"] > 0 and "distill_loss" not in steps[3]
    assert all(steps[s]["scorer_grad_norm"] > 0 for s in (1, 2, 3))  # the scorers learn in both phases
    # A tiny scorer learning rate leaves the scorers nearly where they started (zero) while the rest moves.
    slow, fast = tmp_path / "slow", tmp_path / "fast"
    for run_dir, scale in ((slow, 1e-6), (fast, 1.0)):
        quiet(load_config(ROOT / "configs/demo.yaml", run_overrides(corpus, data_dir, run_dir, **{
            "train.steps": 2, "train.scorer_learning_rate_scale": scale})))
    slow_weights, fast_weights = w_score(slow, 2), w_score(fast, 2)
    scorer = "blocks/0/attention/scorer/w_score"
    assert 0 < np.abs(slow_weights[scorer]).max() < 1e-5 * np.abs(fast_weights[scorer]).max()
