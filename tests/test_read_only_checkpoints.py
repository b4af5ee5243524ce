"""Opening a run's checkpoints read-only (evaluation, generation, train.init_from) logs no warnings."""

import logging

import optax
from flax import nnx

from sparsek_jax.nn import TransformerLM
from sparsek_jax.nn.config import ModelConfig
from sparsek_train.checkpointing import RunCheckpoints


def test_reading_checkpoints_logs_no_warnings(tmp_path, caplog):
    config = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                         mlp_dim=32, attention="dense")
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    writer = RunCheckpoints(tmp_path, asynchronous=False)
    writer.save(1, model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), {}, {"step": 1})
    writer.close()
    caplog.set_level(logging.WARNING)
    absl_level = logging.getLogger("absl").level
    reader = RunCheckpoints(tmp_path, read_only=True)
    assert reader.steps() == [1]
    reader.restore(1, TransformerLM(config, rngs=nnx.Rngs(1)))
    reader.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert logging.getLogger("absl").level == absl_level  # hidden only while the manager is built
