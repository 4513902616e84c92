"""Building a `TrainConfig` from YAML files and dotted `section.key=value` overrides, and describing it.

    cfg = load_config("configs/demo.yaml", ["algo.clip_high=0.28", "run.steps=50"])

Every key is checked against the dataclass tree in `schema.py`: an unknown key is an error naming the closest
valid one, and a value of the wrong type names the key and what to write instead.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from npo_engine.config.schema import ConfigError, TrainConfig


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of its fields, got {value!r}")
        return _build(annotation, value, key + ".")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r} is invalid: choose one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]  # `levels=3` or `train_files=a.jsonl` from the command line
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} entries, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} is invalid: use true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} is invalid: use an integer")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads `1e-6` (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} is invalid: use a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} is invalid: use a string")
        return str(value)
    return value


def _unknown_key_error(cls: type, name: str, prefix: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(prefix + v for v in valid)}"
    return ConfigError(f"unknown config key {prefix}{name}; {hint}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    types = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in types:
            raise _unknown_key_error(cls, name, prefix)
        kwargs[name] = _coerce(value, types[name], prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`algo.clip_high=0.28` -> (["algo", "clip_high"], 0.28); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. algo.clip_high=0.28")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part; write section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _merge(base: dict[str, Any], path: list[str], value: Any, cls: type) -> None:
    """Set base[path] = value, checking each key against the dataclass tree so typos fail early."""
    node, node_cls, prefix = base, cls, ""
    for part in path[:-1]:
        types = _field_types(node_cls)
        if part not in types or not dataclasses.is_dataclass(types[part]):
            if part not in types:
                raise _unknown_key_error(node_cls, part, prefix)
            raise ConfigError(f"{prefix}{part} is a value, not a section; write {prefix}{part}=...")
        node = node.setdefault(part, {})
        node_cls, prefix = types[part], prefix + part + "."
    if path[-1] not in _field_types(node_cls):
        raise _unknown_key_error(node_cls, path[-1], prefix)
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from an optional YAML file, then `key.sub=value` overrides applied in order."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        for section, body in (loaded or {}).items():
            if body is None:  # `rollout:` with every key commented out: the section's defaults
                body = {}
            if not isinstance(body, dict):
                _merge(values, [section], body, TrainConfig)  # an unknown section fails here, clearly
                raise ConfigError(f"{section} in {path} must be a mapping of its fields (section: {{key: value}}), "
                                  f"got {body!r}")
            for key, value in body.items():
                _merge(values, [section, key], value, TrainConfig)
    for text in overrides:
        keys, value = parse_override(text)
        _merge(values, keys, value, TrainConfig)
    return _build(TrainConfig, values)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass (attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def describe_fields(cfg_cls: type = TrainConfig) -> str:
    """Every config key with its default and docstring, for `--help`."""
    lines = []
    defaults = cfg_cls()
    for section in dataclasses.fields(cfg_cls):
        section_cls = _field_types(cfg_cls)[section.name]
        lines.append(f"{section.name}: {section_cls.__doc__.strip().splitlines()[0]}")
        docs = field_docs(section_cls)
        for f in dataclasses.fields(section_cls):
            default = config_to_dict(getattr(getattr(defaults, section.name), f.name))
            lines.append(f"  {section.name}.{f.name} (default {default!r})")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)
