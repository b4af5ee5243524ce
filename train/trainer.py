"""``sparsek-train CONFIG [key.sub=value ...]``: trains a language model from a run config.

AdamW with warmup + cosine decay, gradient clipping and optional accumulation; parameters, optimizer state and
batches sharded over a (data, fsdp, tensor) mesh by logical axis rules; jit with donation. Checkpoints (Orbax,
async, keep-N, atomic) every ``train.checkpoint_every`` steps and on SIGTERM / Ctrl-C; rerunning the same
command resumes from the newest one (model, optimizer, step, data order), giving the same losses as an
uninterrupted run. Metrics go to RUN_DIR/metrics.jsonl (and TensorBoard if asked).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsek_jax import data
from sparsek_train import app, distributed, run_dir, tasks
from sparsek_train.checkpointing import CheckpointError, RunCheckpoints
from sparsek_train.config import ConfigError, RunConfig, dump_config
from sparsek_train.evaluate import evaluate, make_eval_step
from sparsek_train.initial_weights import is_pretrained_directory, load_initial_weights
from sparsek_train.metrics import MetricsWriter, Progress, peak_flops, training_flops_per_token
from sparsek_jax.nn.sharding import activate


def next_token_loss(model, batch, teacher: bool = False):
    """Mean cross-entropy over the tokens of ``loss_mask`` (every token of a text batch; the answers of a
    recall batch), and the scorers' distillation loss: with ``teacher`` the SparseK layers attend densely
    and their scorers learn from that attention (``TransformerLM.teacher_forward``); else 0. Returns
    ``(total, (cross_entropy, distillation))``."""
    inputs = (batch["inputs"],)
    kwargs = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}
    logits, distill = model.teacher_forward(*inputs, **kwargs) if teacher else (model(*inputs, **kwargs), 0.0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    loss = jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss + distill, (loss, jnp.asarray(distill, jnp.float32))


@functools.cache
def make_train_step(accumulate: int, *, teacher: bool = False):
    """One optimizer step; with ``accumulate > 1`` the batch is split into microbatches whose gradients are
    averaged under ``lax.scan`` (one microbatch's activations alive at a time). ``teacher``: a scorer
    distillation step (``next_token_loss``). ``learning_rates``: float32 ``[len(app.RATE_GROUPS)]``, a row of
    ``app.learning_rates``, an argument rather than a constant so that one compiled step serves every schedule
    and phase. One step function per ``(accumulate, teacher)``: runs in one process (a sweep, a notebook)
    share its compiled programs."""
    loss_fn = lambda model, batch: next_token_loss(model, batch, teacher)

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer, batch, learning_rates):
        if accumulate == 1:
            (_, (loss, distill)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
        else:
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            micro = jax.tree.map(lambda x: x.reshape((accumulate, -1) + x.shape[1:]), batch)

            def accumulate_one(carry, microbatch):
                loss_sum, distill_sum, grad_sum = carry
                (_, (loss, distill)), grads = jax.value_and_grad(
                    lambda p: loss_fn(nnx.merge(graphdef, p, rest), microbatch), has_aux=True)(params)
                return (loss_sum + loss, distill_sum + distill, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            scalar = jnp.zeros((), jnp.float32)
            (loss, distill, grads), _ = jax.lax.scan(accumulate_one, (scalar, scalar, zeros), micro)
            loss, distill = loss / accumulate, distill / accumulate
            grads = jax.tree.map(lambda g: g / accumulate, grads)
        grad_norm = optax.tree.norm(grads)
        # Whether the scorers learn at all: a key outside every query's top-k sends them no gradient.
        scorer_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if app.is_scorer(path)]
        # Applies nothing unless the gradients are finite (optimizer_transform).
        optimizer.update(model, grads, learning_rates=learning_rates)
        return {"loss": loss, "distill_loss": distill, "grad_norm": grad_norm,
                "scorer_grad_norm": optax.tree.norm(scorer_grads) if scorer_grads else None,
                "finite": jnp.isfinite(loss) & jnp.isfinite(distill) & jnp.isfinite(grad_norm)}

    return train_step


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became non-finite (the command exits with status 1)."""


@jax.jit
def _watch_update(state, step, out):
    first_step, first_loss, first_norm, streak, skipped = state
    bad = ~out["finite"]
    new = (first_step < 0) & bad
    return (jnp.where(new, step, first_step), jnp.where(new, out["loss"], first_loss),
            jnp.where(new, out["grad_norm"], first_norm), jnp.where(bad, streak + 1, 0), skipped + bad)


class _NonFiniteWatch:
    """Counts non-finite steps on the device (no wait per step). ``check()`` (at log and checkpoint steps)
    raises ``NonFiniteError`` on the first one (``train.on_nonfinite: stop``) or after ``max_skipped_steps`` in a
    row (``skip``); their updates were never applied (``optimizer_transform``)."""

    def __init__(self, mode: str, max_skipped: int):
        self.mode, self.max_skipped = mode, max_skipped
        self.state = (jnp.int32(-1), jnp.float32(0), jnp.float32(0), jnp.int32(0), jnp.int32(0))

    def update(self, step: int, out: dict) -> None:
        self.state = _watch_update(self.state, jnp.int32(step), out)

    def check(self, last_saved: int | None) -> int:
        """Raises on a diverged run; returns the number of skipped steps so far."""
        first_step, first_loss, first_norm, streak, skipped = (x.item() for x in jax.device_get(self.state))
        if first_step >= 0 and (self.mode == "stop" or streak >= self.max_skipped):
            kept = f"the newest checkpoint (step {last_saved}) is kept" if last_saved else "no checkpoint was saved"
            why = "" if self.mode == "stop" else f" and the {streak} steps after it; train.max_skipped_steps reached"
            raise NonFiniteError(f"loss or gradient norm not finite at step {first_step} (loss {first_loss}, "
                                 f"grad_norm {first_norm}){why}; stopped without saving, {kept}. Lower "
                                 f"train.learning_rate, check the data, or set train.on_nonfinite=skip")
        return skipped


def _check_replicas(session, step: int) -> None:
    """Across processes, every copy of a parameter must hold the same values before they are saved."""
    if jax.process_count() == 1:
        return
    mismatched = distributed.replica_mismatches(nnx.state(session.model, nnx.Param))
    if mismatched:
        raise CheckpointError(f"step {step}: the copies of parameter {mismatched[0]} differ between devices "
                              f"({len(mismatched)} parameters differ); nothing was saved")


class _StopRequest:
    """Turns SIGTERM and Ctrl-C into a request to checkpoint and stop after the current step.

    With the distributed runtime, JAX's preemption service owns SIGTERM (Ctrl-C is passed on to it as SIGTERM):
    it makes every process stop after the same step, whichever of them got the signal, so that they save one
    consistent checkpoint instead of waiting for each other forever."""

    def __init__(self):
        self.signal = None
        self.distributed = jax.distributed.is_initialized()
        signals = (signal.SIGINT,) if self.distributed else (signal.SIGTERM, signal.SIGINT)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        if self.distributed:
            os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> bool:
        """Whether to stop after ``step`` (every process calls this after every step)."""
        if self.distributed:
            return distributed.preemption_agreed(step)
        return self.signal is not None

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class _Evaluation:
    """Held-out evaluation during and after training, written to the metrics: the loss of the first set
    (documents, or the recall task) and the answer accuracy of every set with answers."""

    def __init__(self, session, metrics: MetricsWriter):
        config = session.config
        self.session, self.metrics = session, metrics
        self.sets = tasks.evaluation_sets(config, session.prepared, config.data.eval_seq_len,
                                          examples=config.train.eval_batches * config.data.eval_batch_size)
        self.step_fn = make_eval_step(session.model_config, answers=True)

    def __call__(self, step: int) -> dict:
        config = self.session.config
        record, first = {"step": step}, None
        for evaluation_set in self.sets:
            result = evaluate(self.session.model, evaluation_set.examples, batch_size=config.data.eval_batch_size,
                              bytes_per_token=evaluation_set.bytes_per_token, sharding=self.session.batch_sharding,
                              max_batches=config.train.eval_batches, step_fn=self.step_fn)
            if first is None:
                first = result
                record.update({"eval_loss": result["loss"], "eval_perplexity": result["perplexity"],
                               "eval_bits_per_byte": result["bits_per_byte"]})
            answers = result.get("answers")
            if answers is not None:
                record[f"eval_{evaluation_set.name}_accuracy"] = answers["accuracy"]
                record[f"eval_{evaluation_set.name}_sequence_accuracy"] = answers["sequence_accuracy"]
                for selection in answers["selection"]:  # how often the needed key was attended, per layer
                    attended = 1.0 - selection["best_head"]["not_attended"]
                    record[f"eval_{evaluation_set.name}_attended_layer{selection['layer']}"] = attended
        self.metrics.write(record)
        return first


def _describe(session, examples, log) -> float:
    """Logs the model and the mesh; returns the training FLOPs per step (for MFU)."""
    config, model_cfg = session.config, session.model_config
    params = sum(x.size for x in jax.tree.leaves(nnx.state(session.model, nnx.Param)))
    log(f"model: {params / 1e6:.2f}M parameters, layers {model_cfg.layer_kinds}, mesh "
        f"{dict(session.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"{len(examples):,} training sequences of {config.data.seq_len} tokens")
    return training_flops_per_token(model_cfg, config.data.seq_len) * config.data.batch_size * config.data.seq_len


def train(config: RunConfig, *, log=print, show_progress: bool = True) -> dict:
    """Runs (or resumes) training; returns a summary. Raises ``ConfigError`` / ``ValueError`` on bad input,
    ``NonFiniteError`` when the loss diverges and ``CheckpointError`` when a checkpoint cannot be written."""
    distributed.initialize(config)
    distributed.check_same_config(config)
    is_main = distributed.is_main()
    if not is_main:  # process 0 speaks for the run
        return _train(config, Path(config.train.run_dir), log=lambda message: None, show_progress=False,
                      is_main=False)
    directory = run_dir.create(config.train.run_dir)
    with run_dir.locked(directory):
        return _train(config, directory, log=log, show_progress=show_progress, is_main=True)


def _train(config: RunConfig, directory: Path, *, log, show_progress: bool, is_main: bool) -> dict:
    t = config.train
    checkpoints = RunCheckpoints(directory / "checkpoints", keep=t.keep_checkpoints, asynchronous=t.async_checkpoints)
    try:
        return _run(config, directory, checkpoints, log=log, show_progress=show_progress, is_main=is_main)
    finally:
        failing = sys.exc_info()[0] is not None
        try:
            checkpoints.close()  # waits for the asynchronous save to land
        except CheckpointError:
            if not failing:  # a save that failed in the background; otherwise the error in flight says more
                raise


def _run(config: RunConfig, directory: Path, checkpoints: RunCheckpoints, *, log, show_progress: bool,
         is_main: bool) -> dict:
    t = config.train
    if checkpoints.steps():
        run_dir.check_same_model(directory, config)
    # A fresh run from a Hugging Face checkpoint builds its model from the files (no initialisation first).
    pretrained = t.init_from if t.init_from and not checkpoints.steps() and is_pretrained_directory(t.init_from) \
        else None
    session = app.build_session(config, with_optimizer=True, pretrained=pretrained, log=log)
    if is_main:
        (directory / "config.yaml").write_text(dump_config(config))
    examples = tasks.training_examples(config, session.prepared)
    iterator = iter(data.training_batches(examples, global_batch_size=config.data.batch_size,
                                          seed=config.data.seed))
    metrics = MetricsWriter(directory, tensorboard=t.tensorboard, enabled=is_main)

    step, latest = 0, None
    with activate(session.mesh):
        restored = checkpoints.restore_newest(session.model, session.optimizer, log=log)
    if restored is not None:
        latest, data_state, meta = restored
        iterator.set_state(data_state)
        step = meta["step"]
        log(f"resumed from {directory / 'checkpoints' / str(latest)} at step {step}")
    elif t.init_from and pretrained is None:
        with activate(session.mesh):
            load_initial_weights(session.model, t.init_from, log=log)
    metrics.keep_until(step if restored is not None else -1)  # a fresh run keeps nothing of an earlier try
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_step, peak = _describe(session, examples, log), peak_flops()
    learning_rates = app.learning_rates(config)
    train_steps = {teacher: make_train_step(t.accumulate, teacher=teacher) for teacher in (False, True)}
    evaluation = _Evaluation(session, metrics)
    stop = _StopRequest()
    watch = _NonFiniteWatch(t.on_nonfinite, t.max_skipped_steps)
    progress = Progress(t.steps, step, enabled=is_main and show_progress)
    interval_start, interval_steps = time.perf_counter(), 0
    last, final, last_saved, stopping = {}, None, latest, False
    try:
        with activate(session.mesh):
            if restored is None and t.eval_every:  # where training starts from: the untrained model
                evaluation(0)
            while step < t.steps and not stopping:
                batch = data.global_batch(next(iterator), session.batch_sharding)
                teacher = step < t.scorer_distill_steps  # compiled only if used
                out = train_steps[teacher](session.model, session.optimizer, batch, learning_rates[step])
                step += 1
                interval_steps += 1
                watch.update(step, out)
                stopping = stop.requested(step)
                if step % t.log_every == 0 or step == t.steps:
                    skipped = watch.check(last_saved)  # waits for the step
                    loss = float(out["loss"])
                    elapsed = time.perf_counter() - interval_start
                    tokens_per_s = interval_steps * tokens_per_step / elapsed
                    last = {"step": step, "loss": loss, "grad_norm": float(out["grad_norm"]),
                            "learning_rate": float(learning_rates[step - 1, app.SCHEDULE]),
                            "tokens_per_s": tokens_per_s, "tokens_seen": step * tokens_per_step,
                            "mfu": (flops_per_step * interval_steps / elapsed / (peak * jax.device_count())
                                    if peak else None)}
                    if teacher:
                        last["distill_loss"] = float(out["distill_loss"])
                    if out["scorer_grad_norm"] is not None:
                        last["scorer_grad_norm"] = float(out["scorer_grad_norm"])
                    if skipped:
                        last["skipped_steps"] = skipped
                    metrics.write(last)
                    progress.update(interval_steps, loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                    interval_start, interval_steps = time.perf_counter(), 0
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    evaluation(step)
                if step % t.checkpoint_every == 0 or step == t.steps or stopping:
                    watch.check(last_saved)  # never save over the last good checkpoint
                    _check_replicas(session, step)
                    checkpoints.save(step, session.model, session.optimizer, iterator.get_state(),
                                     {"step": step, "seed": t.seed}, force=True)
                    last_saved = step
            interrupted = stopping and step < t.steps
            if not interrupted:
                final = evaluation(step)
    finally:
        progress.close()
        stop.restore()
        metrics.close()
    if interrupted:
        log(f"stopped by signal at step {step}; checkpoint saved. Run the same command again to resume.")
    else:
        log(f"done: step {step}, train loss {last.get('loss', float('nan')):.4f}, held-out loss "
            f"{final['loss']:.4f} (perplexity {final['perplexity']:.1f}"
            + (f", {final['bits_per_byte']:.3f} bits/byte" if final["bits_per_byte"] is not None else "")
            + (f", answer accuracy {final['answers']['accuracy']:.3f}" if "answers" in final else "")
            + f" on {final['tokens']:,} tokens)")
    log(f"outputs: {directory}/metrics.jsonl, {directory}/checkpoints/, {directory}/config.yaml")
    return {"step": step, "interrupted": interrupted, "last": last, "eval": final, "run_dir": str(directory)}


def main(argv=None) -> int:
    config, code = app.parse_config("sparsek-train", __doc__, argv, require=("model", "train"))
    if config is None:
        return code
    try:
        summary = train(config)
    except ConfigError as error:
        print(f"sparsek-train: config error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointError) as error:
        print(f"sparsek-train: {error}", file=sys.stderr)
        return 1
    if distributed.is_main():
        print(json.dumps({k: v for k, v in summary.items() if k in ("step", "interrupted", "run_dir")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
