"""The kernels and the math they share, imported as ``sparsek_kernels``. They take arrays and static sizes and
know nothing of the library above them.

Shared math (plain ``jnp``, run by the XLA path and inside kernels alike):
- ``common``: the selection rule, the pattern of (query, key) pairs, logits, score gradients, binary search;
- ``simulation``: the thresholds' event simulation over chunks (one lane per chunk).

Twins (the same computation as plain XLA and as kernels, tested against each other):
- ``thresholds_xla`` / ``thresholds_pallas``: the thresholds' steps (summary scan, cut states, lanes) in XLA
  and as Pallas GPU kernels;
- the attention itself: its XLA path is ``sparsek_jax.xla_attention``; ``gpu`` holds the Pallas GPU kernels
  and ``tpu`` the Pallas TPU kernels, each with an adapter from the library's layout;
- ``layout``: the tiles the attention kernels read, built from the library's arrays and back.
"""
