"""Random inputs for the tests and the comparison every fast path makes against the reference."""

import os

import jax
import jax.numpy as jnp
import numpy as np


def cpu_devices_env(devices: int, **extra) -> dict:
    """The environment of a subprocess that sees ``devices`` CPU devices, keeping the session's XLA flags (the
    tests' compile level) and adding ``extra``."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **extra)


def two_training_steps(config_args: list[str], *, with_hlo: bool = True) -> dict:
    """Two training steps of the run that ``config_args`` (a config path, then overrides) configures, on the
    devices this process has: the losses, the mesh, the shardings of a few parameters and of the batch, and (with
    ``with_hlo``) the compiled step's all-gather lines. The tests run it in their own process (one device) and in
    a subprocess that has eight."""
    from sparsek_jax import data
    from sparsek_jax.nn.sharding import activate
    from sparsek_train import app
    from sparsek_train.config import load_config
    from sparsek_train.trainer import make_train_step

    config = load_config(config_args[0], config_args[1:])
    session = app.build_session(config, with_optimizer=True, log=lambda m: None)
    block = session.model.blocks[0]
    specs = {"q_proj": block.attention.q_proj[...].sharding.spec, "embed": session.model.embed[...].sharding.spec,
             "w_score": block.attention.scorer.w_score[...].sharding.spec,
             "mlp_down": block.mlp.down[...].sharding.spec}
    packed = data.PackedSequences(session.prepared.splits["train"], config.data.seq_len)
    iterator = iter(data.training_batches(packed, global_batch_size=config.data.batch_size, seed=0))
    step = make_train_step(config.train.accumulate)
    rates = app.learning_rates(config)
    lines = []
    with activate(session.mesh):
        losses = []
        for _ in range(2):
            batch = data.global_batch(next(iterator), session.batch_sharding)
            if with_hlo and not losses:
                hlo = step.lower(session.model, session.optimizer, batch, rates[0]).compile().as_text()
                lines = [line for line in hlo.splitlines() if " all-gather" in line]
            losses.append(float(step(session.model, session.optimizer, batch, rates[len(losses)])["loss"]))
        specs["batch"] = batch["inputs"].sharding.spec
    return {"devices": jax.device_count(), "mesh": dict(session.mesh.shape), "losses": losses,
            "specs": {k: str(v) for k, v in specs.items()}, "lines": lines}


def write_text_corpus(root, documents: int, words_per_document: int):
    """``documents`` small ``.txt`` files of random words under ``root`` (a ``text_files`` corpus); returns
    ``root``. Fixed seed: every test that builds one reads the same texts."""
    rng = np.random.default_rng(0)
    words = "the state of the union is strong and congress shall make laws for the people of the nation".split()
    for i in range(documents):
        (root / f"d{i}.txt").write_text(" ".join(rng.choice(words, size=words_per_document)))
    return root


def random_qkv(rng, batch, seq, q_heads, kv_heads, dim, dtype=np.float32):
    shapes = ((batch, seq, q_heads, dim), (batch, seq, kv_heads, dim), (batch, seq, kv_heads, dim))
    return tuple(jnp.asarray(rng.normal(size=s).astype(dtype)) for s in shapes)


def random_scores(rng, batch, seq, heads, *, scale=1.0, ties=False, slope=0.0):
    """Gaussian scores ``[batch, seq, heads]`` times ``scale`` plus ``slope * position``; ``ties`` rounds them to
    halves (many exact ties)."""
    u = rng.normal(size=(batch, seq, heads)) * scale + slope * np.arange(seq)[None, :, None]
    if ties:
        u = np.round(u * 2) / 2
    return jnp.asarray(u.astype(np.float32))


def random_segments(rng, batch, seq, *, documents=3):
    """int32 ``[batch, seq]`` document ids 0, 1, ...: contiguous runs with random cuts per row."""
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=min(documents - 1, seq - 1), replace=False))
        rows.append(np.searchsorted(cuts, np.arange(seq), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)


def attention_inputs(rng, batch, seq, q_heads, kv_heads, dim, *, ties=False, segmented=False):
    """q, k, v, scores and segment ids (or None)."""
    q, k, v = random_qkv(rng, batch, seq, q_heads, kv_heads, dim)
    u = random_scores(rng, batch, seq, kv_heads, scale=1.5, ties=ties)
    return q, k, v, u, random_segments(rng, batch, seq) if segmented else None


def value_and_grads(attention, q, k, v, u, cotangent):
    """``attention(q, k, v, u)`` and its gradients with respect to all four, for the output cotangent, jitted."""
    def run(q, k, v, u):
        out, vjp = jax.vjp(attention, q, k, v, u)
        return out, vjp(cotangent)
    return jax.jit(run)(q, k, v, u)


def assert_matches_reference(got, want, *, atol=2e-5, grad_atol=5e-5):
    """``got`` and ``want`` are ``(out, (dq, dk, dv, dscores))`` pairs; float32 tolerances."""
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=atol, rtol=1e-5, err_msg="output")
    for name, g, w in zip(("dq", "dk", "dv", "dscores"), got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=grad_atol, rtol=1e-4, err_msg=name)
