"""Metrics: JSONL always, TensorBoard optional, a progress bar, and SparseK-aware FLOP counts for MFU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

# Dense bf16 peak FLOP/s per chip (vendor figures), for MFU. Unknown devices report no MFU.
PEAK_FLOPS = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
              "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v4": 275e12, "TPU v6 lite": 918e12}


def keys_per_query(kind: str, seq_len: int, topk: int, window: int) -> float:
    """Mean number of keys a query attends to, over positions 0..seq_len-1."""
    positions = range(seq_len)
    if kind == "dense":
        return (seq_len + 1) / 2
    if kind == "sliding":  # sparsek and block_topk below: the window plus up to topk older keys
        return sum(min(p + 1, window) for p in positions) / seq_len
    return sum(min(p + 1, window) + min(max(p + 1 - window, 0), topk) for p in positions) / seq_len


def training_flops_per_token(config, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6 x (matmul parameters) plus attention scores and values over the
    keys each layer's queries actually attend to (so SparseK layers count topk + window keys, not seq)."""
    c = config
    per_layer = (c.d_model * c.head_dim * (c.num_heads * 2 + c.num_kv_heads * 2) + 3 * c.d_model * c.mlp_dim)
    matmul = c.num_layers * per_layer + c.d_model * c.vocab_size
    attention = sum(4 * c.num_heads * c.head_dim * keys_per_query(kind, seq_len, c.topk, c.window)
                    for kind in c.layer_kinds)
    return 6 * matmul + 3 * attention


def peak_flops() -> float | None:
    kind = getattr(jax.devices()[0], "device_kind", "")
    return PEAK_FLOPS.get(kind)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed each write); mirrors scalars to
    TensorBoard when asked (needs ``tensorboardX``)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        if tensorboard and enabled:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ValueError("train.tensorboard: true needs the tensorboardX package (pip install tensorboardX)")
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def keep_until(self, step: int) -> None:
        """Drops the records of steps after ``step``: a resumed run writes the steps it re-runs again, so the
        file holds each step once."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            temporary = self.path.with_suffix(".jsonl.tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            temporary.replace(self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class Progress:
    """A one-line progress bar: step, loss, tokens/s and ETA (tqdm)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step",
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
        self.start = time.perf_counter()

    def update(self, steps: int, **postfix) -> None:
        self.bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in postfix.items()), refresh=False)
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
