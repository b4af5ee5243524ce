"""``sparsek-generate CONFIG checkpoint=RUN_DIR prompt="..." [key=value ...]``: continues a prompt with a trained
model, decoding with the constant-memory cache."""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

from sparsek_train import app
from sparsek_train.checkpointing import CheckpointError


def main(argv=None) -> int:
    config, code = app.parse_config("sparsek-generate", __doc__, argv)
    if config is None:
        return code
    if config.checkpoint is None:
        print("sparsek-generate: checkpoint: expected a run directory (checkpoint=PATH), received nothing",
              file=sys.stderr)
        return 2
    if not config.prompt:
        print("sparsek-generate: prompt: expected some text (prompt=\"...\"), received nothing", file=sys.stderr)
        return 2
    from sparsek_jax.nn import cache_nbytes, generate

    try:
        # Progress goes to stderr: stdout carries the generated text alone.
        session = app.load_session(config, with_optimizer=False, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, CheckpointError) as error:
        print(f"sparsek-generate: {error}", file=sys.stderr)
        return 2
    tokenizer = session.prepared.tokenizer
    prompt = jnp.asarray(tokenizer.encode(config.prompt))[None]
    g = config.generate
    start = time.perf_counter()
    tokens, cache = generate(session.model, prompt, g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                             rng=jax.random.key(g.seed), return_cache=True)
    tokens = jax.device_get(tokens)
    elapsed = time.perf_counter() - start
    print(tokenizer.decode(tokens[0]))
    print(f"\n[{g.max_new_tokens} tokens in {elapsed:.1f} s including compilation; KV cache "
          f"{cache_nbytes(cache) / 2**20:.2f} MiB, constant in the length for sparsek and sliding layers]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
