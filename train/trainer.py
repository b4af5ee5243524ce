"""``sparsek-train CONFIG [key.sub=value ...]``: trains a language model from a run config.

AdamW with warmup + cosine decay, gradient clipping and optional accumulation; parameters, optimizer state and
batches sharded over a (data, fsdp, tensor) mesh by logical axis rules; jit with donation. Checkpoints (Orbax,
async, keep-N, atomic) every ``train.checkpoint_every`` steps and on SIGTERM / Ctrl-C; rerunning the same
command resumes from the newest one (model, optimizer, step, data order), giving the same losses as an
uninterrupted run. Metrics go to RUN_DIR/metrics.jsonl (and TensorBoard if asked).
"""

from __future__ import annotations

import json
import signal
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsek_jax import data
from sparsek_train import app
from sparsek_train.checkpointing import RunCheckpoints
from sparsek_train.config import ConfigError, RunConfig, dump_config
from sparsek_train.evaluate import evaluate, make_eval_step
from sparsek_train.metrics import MetricsWriter, Progress, peak_flops, training_flops_per_token
from sparsek_train.sharding import activate


def next_token_loss(model, batch):
    logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def make_train_step(accumulate: int):
    """One optimizer step; with ``accumulate > 1`` the batch is split into microbatches whose gradients are
    averaged under ``lax.scan`` (one microbatch's activations alive at a time)."""

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer, batch):
        if accumulate == 1:
            loss, grads = nnx.value_and_grad(next_token_loss)(model, batch)
        else:
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            micro = jax.tree.map(lambda x: x.reshape((accumulate, -1) + x.shape[1:]), batch)

            def accumulate_one(carry, microbatch):
                loss_sum, grad_sum = carry
                loss, grads = jax.value_and_grad(
                    lambda p: next_token_loss(nnx.merge(graphdef, p, rest), microbatch))(params)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss, grads), _ = jax.lax.scan(accumulate_one, (jnp.zeros((), jnp.float32), zeros), micro)
            loss, grads = loss / accumulate, jax.tree.map(lambda g: g / accumulate, grads)
        grad_norm = optax.global_norm(grads)
        optimizer.update(model, grads)
        return {"loss": loss, "grad_norm": grad_norm}

    return train_step


class _StopRequest:
    """Turns SIGTERM and Ctrl-C into a request to checkpoint and stop after the current step."""

    def __init__(self):
        self.signal = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class _Evaluation:
    """Held-out evaluation during and after training, written to the metrics."""

    def __init__(self, session, metrics: MetricsWriter):
        config = session.config
        self.session, self.metrics = session, metrics
        self.split = session.prepared.splits["validation"]
        self.windows = data.DocumentWindows(self.split, config.data.eval_seq_len)
        self.step_fn = make_eval_step()

    def __call__(self, step: int) -> dict:
        config = self.session.config
        result = evaluate(self.session.model, self.windows, batch_size=config.data.eval_batch_size,
                          bytes_per_token=self.split.bytes_per_token, sharding=self.session.batch_sharding,
                          max_batches=config.train.eval_batches, step_fn=self.step_fn)
        self.metrics.write({"step": step, "eval_loss": result["loss"], "eval_perplexity": result["perplexity"],
                            "eval_bits_per_byte": result["bits_per_byte"]})
        return result


def _describe(session, packed, log) -> float:
    """Logs the model and the mesh; returns the training FLOPs per step (for MFU)."""
    config, model_cfg = session.config, session.model_config
    params = sum(x.size for x in jax.tree.leaves(nnx.state(session.model, nnx.Param)))
    log(f"model: {params / 1e6:.2f}M parameters, layers {model_cfg.layer_kinds}, mesh "
        f"{dict(session.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"{len(packed):,} training sequences of {config.data.seq_len} tokens")
    return training_flops_per_token(model_cfg, config.data.seq_len) * config.data.batch_size * config.data.seq_len


def train(config: RunConfig, *, log=print, show_progress: bool = True) -> dict:
    """Runs (or resumes) training; returns a summary. Raises ``ConfigError`` / ``ValueError`` on bad input."""
    if config.train.distributed:
        jax.distributed.initialize()
    is_main = jax.process_index() == 0
    session = app.build_session(config, with_optimizer=True, log=log)
    run_dir = session.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (run_dir / "config.yaml").write_text(dump_config(config))
    t = config.train
    packed = data.PackedSequences(session.prepared.splits["train"], config.data.seq_len)
    iterator = iter(data.training_batches(packed, global_batch_size=config.data.batch_size, seed=config.data.seed))
    checkpoints = RunCheckpoints(run_dir / "checkpoints", keep=t.keep_checkpoints, asynchronous=t.async_checkpoints)
    metrics = MetricsWriter(run_dir, tensorboard=t.tensorboard, enabled=is_main)

    step = 0
    latest = checkpoints.latest_step()
    if latest is not None:
        with activate(session.mesh):
            data_state, meta = checkpoints.restore(latest, session.model, session.optimizer)
        iterator.set_state(data_state)
        step = meta["step"]
        log(f"resumed from {run_dir / 'checkpoints' / str(latest)} at step {step}")
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_step, peak = _describe(session, packed, log), peak_flops()
    schedule = app.learning_rate_schedule(config)
    train_step = make_train_step(t.accumulate)
    evaluation = _Evaluation(session, metrics)
    stop = _StopRequest()
    progress = Progress(t.steps, step, enabled=is_main and show_progress)
    interval_start, interval_steps = time.perf_counter(), 0
    last, final = {}, None
    try:
        with activate(session.mesh):
            while step < t.steps and stop.signal is None:
                batch = data.global_batch(next(iterator), session.batch_sharding)
                out = train_step(session.model, session.optimizer, batch)
                step += 1
                interval_steps += 1
                if step % t.log_every == 0 or step == t.steps:
                    loss = float(out["loss"])  # waits for the step
                    elapsed = time.perf_counter() - interval_start
                    tokens_per_s = interval_steps * tokens_per_step / elapsed
                    last = {"step": step, "loss": loss, "grad_norm": float(out["grad_norm"]),
                            "learning_rate": float(schedule(step - 1)),
                            "tokens_per_s": tokens_per_s, "tokens_seen": step * tokens_per_step,
                            "mfu": (flops_per_step * interval_steps / elapsed / (peak * jax.device_count())
                                    if peak else None)}
                    metrics.write(last)
                    progress.update(interval_steps, loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                    interval_start, interval_steps = time.perf_counter(), 0
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    evaluation(step)
                if step % t.checkpoint_every == 0 or step == t.steps or stop.signal is not None:
                    checkpoints.save(step, session.model, session.optimizer, iterator.get_state(),
                                     {"step": step, "seed": t.seed}, force=True)
            interrupted = stop.signal is not None and step < t.steps
            if not interrupted:
                final = evaluation(step)
    finally:
        progress.close()
        stop.restore()
        checkpoints.close()  # waits for the asynchronous save to land
        metrics.close()
    if interrupted:
        log(f"stopped by signal at step {step}; checkpoint saved. Run the same command again to resume.")
    else:
        log(f"done: step {step}, train loss {last.get('loss', float('nan')):.4f}, held-out loss "
            f"{final['loss']:.4f} (perplexity {final['perplexity']:.1f}, {final['bits_per_byte']:.3f} bits/byte on "
            f"{final['tokens']:,} tokens)")
    log(f"outputs: {run_dir}/metrics.jsonl, {run_dir}/checkpoints/, {run_dir}/config.yaml")
    return {"step": step, "interrupted": interrupted, "last": last, "eval": final, "run_dir": str(run_dir)}


def main(argv=None) -> int:
    config, code = app.parse_config("sparsek-train", __doc__, argv)
    if config is None:
        return code
    try:
        summary = train(config)
    except ConfigError as error:
        print(f"sparsek-train: config error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k in ("step", "interrupted", "run_dir")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
