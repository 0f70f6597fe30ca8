"""Reading a run configuration: a YAML file and ``a.b.c=value`` overrides -> a typed
:class:`Config`. Unknown keys and values of the wrong type are rejected while reading."""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any, Optional

import yaml

from srft_mcore.config.errors import ConfigError, _err
from srft_mcore.config.schema import CHOICES, Config


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the annotation ``typ``; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif typ is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    name = getattr(typ, "__name__", str(typ))
    raise _err(key, value, f"expected {name}, got {type(value).__name__}",
               f"give a {name} value, e.g. {key}=<{name}>")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise _err(prefix.rstrip("."), data, "expected a mapping",
                   f"write '{prefix.rstrip('.')}:' as a YAML mapping of its fields")
    ftypes = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        full = prefix + key
        if key not in ftypes:
            known = ", ".join(sorted(ftypes))
            raise _err(full, value, "unknown key", f"use one of: {known}")
        typ = ftypes[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value or {}, full + ".")
        else:
            kwargs[key] = _coerce(full, value, typ)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise _err(dotted, value, f"'{p}' is not a section", "override a leaf key")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> (``a.b.c``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} has no '='. Fix: write key=value, "
                          f"e.g. parallel.tp=2")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """Read ``path`` (YAML; None = defaults) and apply ``key=value`` overrides."""
    tree: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config error: config file {path!r} does not exist. "
                              f"Fix: pass --config with a YAML file (see examples/configs/)")
        with open(path) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config error: {path} is not valid YAML: {e}") from None
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    if cfg.algorithm.name in CHOICES["algorithm.name"]:  # else validate() names the problem
        from srft_mcore.algo.defaults import resolve

        cfg.algorithm = resolve(cfg.algorithm)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def describe(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2, default=str)
