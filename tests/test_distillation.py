"""The dense teacher: its attention is plain causal attention, and its loss teaches a scorer which keys the
queries read beyond their window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparsek_jax.nn as sknn
from builders import random_qkv, random_scores, random_segments
from sparsek_jax.distillation import dense_teacher_attention


def loop_loss(q, k, scores, window, segments):
    """The loss from its definition, in float64 loops."""
    q, k, u = (np.asarray(x, np.float64) for x in (q, k, scores))
    batch, seq, q_heads, dim = q.shape
    group = q_heads // k.shape[2]
    total = weight = 0.0
    for b in range(batch):
        for h in range(k.shape[2]):
            for i in range(seq):
                keys = [j for j in range(i + 1) if segments[b, j] == segments[b, i]]
                cand = [j for j in keys if j <= i - window]
                if not cand:
                    continue
                attention = np.zeros(seq)
                for g in range(group):
                    logits = np.array([q[b, i, h * group + g] @ k[b, j, h] / np.sqrt(dim) for j in keys])
                    p = np.exp(logits - logits.max())
                    attention[keys] += p / p.sum() / group
                log_student = u[b, cand, h] - np.log(np.exp(u[b, cand, h]).sum())
                total -= attention[cand] @ log_student
                weight += attention[cand].sum()
    return total / weight


@pytest.mark.parametrize("window, segmented", [(0, False), (3, True), (5, False)])
def test_teacher_output_and_loss(rng, window, segmented):
    q, k, v = random_qkv(rng, 2, 23, 4, 2, 8)
    scores = random_scores(rng, 2, 23, 2)
    segments = random_segments(rng, 2, 23) if segmented else jnp.zeros((2, 23), jnp.int32)
    out, loss = dense_teacher_attention(q, k, v, scores, window=window, segment_ids=segments)
    mask = (segments[:, :, None] == segments[:, None, :])[:, None]
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    np.testing.assert_allclose(out, want, atol=2e-5)
    np.testing.assert_allclose(loss, loop_loss(q, k, scores, window, np.asarray(segments)), rtol=1e-5)


def test_loss_reaches_only_the_scores_and_is_least_at_the_target(rng):
    q, k, v = random_qkv(rng, 1, 12, 2, 1, 8)
    scores = random_scores(rng, 1, 12, 1)
    grads = jax.grad(lambda q, k, v, u: dense_teacher_attention(q, k, v, u, window=2)[1], argnums=(0, 1, 2, 3))(
        q, k, v, scores)
    assert all(float(jnp.abs(g).max()) == 0 for g in grads[:3]) and float(jnp.abs(grads[3]).max()) > 0
    # A scorer trained on the loss alone ends where softmax(u) matches the attention; the loss never rises.
    u, losses = scores, []
    loss_and_grad = jax.jit(jax.value_and_grad(lambda u: dense_teacher_attention(q, k, v, u, window=2)[1]))
    for _ in range(300):
        loss, grad = loss_and_grad(u)
        losses.append(float(loss))
        u = u - 2.0 * grad
    assert losses[-1] < losses[0] - 0.05 and np.all(np.diff(losses) < 1e-6)
    assert float(jnp.abs(grad).max()) < 1e-3


def test_no_candidates_no_loss(rng):
    q, k, v = random_qkv(rng, 1, 6, 2, 2, 4)
    _, loss = dense_teacher_attention(q, k, v, random_scores(rng, 1, 6, 2), window=6)
    assert float(loss) == 0.0


def test_teacher_forward_trains_scorers_towards_what_the_model_reads(rng):
    config = sknn.ModelConfig(vocab_size=40, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                              mlp_dim=32, attention=("sparsek", "dense"), topk=2, window=2, implementation="xla")
    model = sknn.TransformerLM(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, 40, size=(2, 12)), jnp.int32)
    dense = sknn.TransformerLM(sknn.ModelConfig(**{**config.__dict__, "attention": "dense"}), rngs=nnx.Rngs(1))
    shared = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "scorer" not in map(str, p)]
    nnx.update(dense, nnx.from_flat_state(shared))
    # (jitted: one program each instead of an eager compile per operation)
    logits, loss = nnx.jit(lambda m, t: m.teacher_forward(t))(model, tokens)
    np.testing.assert_allclose(logits, nnx.jit(lambda m, t: m(t))(dense, tokens), atol=1e-5)  # attends densely
    assert float(loss) > 0
    grads = nnx.jit(nnx.grad(lambda m, t: m.teacher_forward(t)[1]))(model, tokens)
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(grads)}
    assert all((float(jnp.abs(v[...]).max()) > 0) == ("scorer" in name) for name, v in flat.items())
