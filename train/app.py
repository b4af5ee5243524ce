"""What the command-line tools share: parsing a run config, preparing data, building the sharded model and
optimizer, and restoring a checkpoint."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparsek_jax.nn.scoring import is_scorer_parameter
from sparsek_train import tasks
from sparsek_train.checkpointing import resolve_checkpoint
from sparsek_train.config import ConfigError, RunConfig, load_config
from sparsek_jax.nn.sharding import activate, create_sharded
from sparsek_train.sharding import batch_sharding, make_mesh


def parse_config(prog: str, description: str, argv=None, *, require: tuple[str, ...] = ()
                 ) -> tuple[RunConfig | None, int]:
    """``PROG CONFIG [key.sub=value ...]``; returns ``(config, 0)`` or ``(None, 2)`` after printing the error."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides, require=require), 0
    except ConfigError as error:
        print(f"{prog}: config error: {error}", file=sys.stderr)
        return None, 2


def learning_rate_schedule(config: RunConfig):
    t = config.train
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=min(t.warmup_steps, t.steps - 1),
        decay_steps=t.steps, end_value=t.learning_rate * t.min_learning_rate_ratio)


# The parameter groups that step with rates of their own; the columns of ``learning_rates``.
RATE_GROUPS = ("scorers", "norms", "other")
SCHEDULE = RATE_GROUPS.index("norms")  # the group that follows the schedule in every phase


def learning_rates(config: RunConfig) -> np.ndarray:
    """float32 ``[train.steps, len(RATE_GROUPS)]``: the learning rate of every update (``learning_rate_schedule``
    at the number of updates before it), computed once on the host, for each parameter group: the scoring
    networks' times ``train.scorer_learning_rate_scale``; the norm scales' as scheduled; the other parameters'
    zero for the first ``train.scorers_only_steps`` updates."""
    t = config.train
    schedule = np.asarray(jax.vmap(learning_rate_schedule(config))(jnp.arange(t.steps)), np.float32)
    others = np.where(np.arange(t.steps) < t.scorers_only_steps, np.float32(0), schedule)
    return np.stack([schedule * np.float32(t.scorer_learning_rate_scale), schedule, others], axis=1)


def rate_group(path) -> int:
    """The index in ``RATE_GROUPS`` of a parameter (a pytree key path)."""
    if is_scorer(path):
        return RATE_GROUPS.index("scorers")
    if any(n.endswith("norm") for n in _path_names(path)):
        return RATE_GROUPS.index("norms")
    return RATE_GROUPS.index("other")


def scale_by_learning_rates_argument() -> optax.GradientTransformationExtraArgs:
    """Multiplies each update by its group's rate in the ``learning_rates`` passed to ``update`` (float32
    ``[len(RATE_GROUPS)]``, a row of ``learning_rates``)."""

    def update(updates, state, params=None, *, learning_rates, **extra_args):
        del params, extra_args
        return jax.tree_util.tree_map_with_path(
            lambda path, u: (learning_rates[rate_group(path)] * u).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def optimizer_transform(config: RunConfig):
    """AdamW with global-norm clipping; no weight decay on vectors (norm scales). The learning rates are an
    argument of every update (``optimizer.update(model, grads, learning_rates=...)``, a row of
    ``learning_rates``) rather than a schedule compiled into the step, so a run that changes its length,
    warmup, peak rate, scorer rate or scorers-only phase (a resumed run trained further, a sweep) reuses the
    compiled step. A step whose gradients are not finite changes nothing (``optax.apply_if_finite``); the
    training loop then stops or skips it (``train.on_nonfinite``)."""
    t = config.train
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.apply_if_finite(optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(1.0, b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay, mask=decay_mask),
        scale_by_learning_rates_argument()), max_consecutive_errors=2**31 - 1)


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_scorer(path) -> bool:
    """Whether a parameter (a pytree key path) lies in a scoring network."""
    return is_scorer_parameter(_path_names(path))


@dataclass
class Session:
    config: RunConfig
    prepared: object
    model_config: object
    mesh: object
    batch_sharding: object
    model: object
    optimizer: object | None
    run_dir: Path
    step: int = 0


def build_session(config: RunConfig, *, with_optimizer: bool, pretrained: str | Path | None = None,
                  key: str = "train.init_from", log=print) -> Session:
    """The data, the mesh and the model (with its optimizer), created sharded; with ``pretrained`` (a Hugging
    Face checkpoint directory, named by the config key ``key`` in errors) the model is built abstractly and
    filled from it, never initialised first."""
    from sparsek_jax.nn import TransformerLM
    from sparsek_train.initial_weights import pretrained_model

    prepared = tasks.prepare(config, log=log)
    model_config = config.model_config(prepared.tokenizer.vocab_size)
    mesh = make_mesh(config.train.mesh)
    make_optimizer = lambda model: nnx.Optimizer(model, optimizer_transform(config), wrt=nnx.Param)

    if pretrained is not None:
        with activate(mesh):
            model = pretrained_model(model_config, pretrained, mesh=mesh, seed=config.train.seed, key=key, log=log)
        optimizer = create_sharded(mesh, make_optimizer, model) if with_optimizer else None
    else:
        def build():
            model = TransformerLM(model_config, rngs=nnx.Rngs(config.train.seed))
            return model, make_optimizer(model) if with_optimizer else None

        model, optimizer = create_sharded(mesh, build)
    return Session(config, prepared, model_config, mesh, batch_sharding(mesh), model, optimizer,
                   Path(config.train.run_dir))


def load_session(config: RunConfig, *, with_optimizer: bool, log=print) -> Session:
    """A session whose model holds the weights of ``config.checkpoint``: a run dir or a step dir (whose model
    may differ in its attention, see ``initial_weights``), or a Hugging Face checkpoint directory."""
    from sparsek_train.initial_weights import is_pretrained_directory, load_initial_weights

    if is_pretrained_directory(config.checkpoint):
        session = build_session(config, with_optimizer=with_optimizer, pretrained=config.checkpoint,
                                key="checkpoint", log=log)
        session.run_dir = Path(config.train.run_dir)
    else:
        session = build_session(config, with_optimizer=with_optimizer, log=log)
        with activate(session.mesh):
            load_initial_weights(session.model, config.checkpoint, key="checkpoint", log=log)
        directory, session.step = resolve_checkpoint(config.checkpoint)
        session.run_dir = directory.parent if directory.name == "checkpoints" else directory
    return session
