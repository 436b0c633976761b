"""The one config core: file loading, dotted overrides, typed nested construction, validation, diffs.

Model and training configs are frozen dataclasses that validate themselves in ``__post_init__``.
This module owns everything around them, so both packages share one behaviour:

* :func:`load_config_file` reads JSON, TOML or YAML;
* :func:`apply_overrides` sets dotted ``key=value`` pairs, parsing each value by the type of the
  field it lands on when a schema is given (a ``str`` field keeps ``123`` as text);
* :func:`from_dict` builds a dataclass from a dict: unknown keys are refused with the allowed ones,
  every value is checked against its annotation (unions, ``Optional``, ``Literal``, tuples, nested
  dataclasses; floats must be finite), and a :class:`ConfigError` raised by a nested object is moved to
  its full dotted path as data (:meth:`ConfigError.under`), never by rewriting its message;
* :func:`config_diff` lists the dotted paths where two config dicts differ (resume checks).

A dataclass that reports its fields under a fixed prefix when constructed alone (``EngramConfig``
says ``engram.head_dim``) declares that prefix as a ``config_section`` class attribute.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from engramlm.errors import ConfigError

__all__ = [
    "apply_overrides",
    "config_diff",
    "deep_merge",
    "finite",
    "from_dict",
    "int_at_least",
    "load_config_file",
    "need",
    "one_of",
    "parse_value",
    "to_jsonable",
    "undot",
]

_NULL_WORDS = ("none", "null", "~")


# ---- validation helpers (used in __post_init__) ------------------------------------------------


def need(cond: bool, field: str, message: str) -> None:
    """Raise ``ConfigError(message, field)`` unless ``cond``."""
    if not cond:
        raise ConfigError(message, field)


def int_at_least(value: Any, field: str, low: int) -> None:
    """``value`` is an int (not a bool) >= ``low``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    need(ok, field, f"must be an int >= {low}, got {value!r}")


def finite(value: Any, field: str) -> None:
    """``value`` is a finite real number (not a bool, not inf or NaN)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    need(ok, field, f"must be a finite number, got {value!r}")


def one_of(value: Any, field: str, allowed: Iterable[Any]) -> None:
    """``value`` is one of ``allowed`` (the message lists them)."""
    allowed = tuple(allowed)
    need(value in allowed, field, f"must be one of {allowed}, got {value!r}")


# ---- files, merging, overrides ---------------------------------------------------------------------


def load_config_file(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read JSON, TOML or YAML into a dict; with ``section``, use that table if present."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p} is a directory, not a file" if p.is_dir() else f"{p} does not exist", "config file")
    text = p.read_text(encoding="utf-8")
    if p.suffix not in (".json", ".toml", ".yaml", ".yml"):
        raise ConfigError(f"unknown extension {p.suffix!r}; use .json, .toml, .yaml or .yml", "config file")
    try:
        data = _parse(p.suffix, text)
    except ValueError as exc:  # json, tomllib and (wrapped) yaml errors
        raise ConfigError(f"cannot parse {p}: {exc}", "config file") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a table/object at top level", "config file")
    if section and isinstance(data.get(section), dict):
        return data[section]
    return data


def _parse(suffix: str, text: str) -> Any:
    if suffix == ".json":
        return json.loads(text)
    if suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    try:
        import yaml
    except ImportError as exc:
        raise ValueError("YAML configs need PyYAML (pip install pyyaml)") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, recursively for tables; neither input is modified."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def undot(d: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (TOML/YAML files may use either form)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        v = undot(v) if isinstance(v, dict) else v
        parts = k.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = deep_merge(node[parts[-1]], v) if isinstance(node.get(parts[-1]), dict) else v
    return out


def parse_value(text: str) -> Any:
    """An override's value: JSON when it parses (``3``, ``1e-3``, ``true``, ``[1,2]``, ``null``), else text."""
    low = text.strip().lower()
    if low in _NULL_WORDS:
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _override_types(cls: type) -> dict[str, Any]:
    """Field types for walking an override path: a table field may name its own schema in its metadata
    (``field(metadata={"schema": ModelConfig})``), so overrides below it are checked and typed too."""
    types_ = _field_types(cls)
    return {f.name: f.metadata.get("schema", types_[f.name]) for f in dataclasses.fields(cls)}


def _unknown_field(path: str, key: str, allowed: Iterable[str]) -> ConfigError:
    field = f"{path}.{key}" if path else key
    return ConfigError(f"unknown field; allowed: {sorted(allowed)}", field)


def _dataclass_arm(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return arms[0] if len(arms) == 1 else None
    return None


def _is_text(tp: Any) -> bool:
    """A field whose override values are taken verbatim: ``str`` or ``str | None``."""
    if tp is str:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return set(typing.get_args(tp)) == {str, type(None)}
    return False


def apply_overrides(d: Mapping[str, Any], overrides: Iterable[str], schema: type | None = None) -> dict[str, Any]:
    """Set dotted ``key=value`` pairs into a nested dict; a path through a non-table is an error.

    With ``schema`` (a config dataclass), keys are checked field by field as far as the schema reaches
    (an unknown key names its dotted path and the allowed keys; a table field can extend the schema with
    ``metadata={"schema": cls}``), and a value landing on a ``str`` field
    is kept as text; elsewhere it is parsed by :func:`parse_value` and checked when the config is built.
    """
    out = undot(d)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value with a dotted key, e.g. optim.lr=1e-3")
        parts = key.split(".")
        tp: Any = schema
        node = out
        for i, p in enumerate(parts):
            cls = _dataclass_arm(tp)
            if cls is not None:
                types_ = _override_types(cls)
                if p not in types_:
                    raise _unknown_field(".".join(parts[:i]), p, types_)
                tp = types_[p]
            else:
                tp = None
            if i == len(parts) - 1:
                break
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"is a value, cannot set {key!r} below it", ".".join(parts[: i + 1]))
            node = nxt
        is_null = raw.strip().lower() in _NULL_WORDS
        node[parts[-1]] = raw if tp is not None and _is_text(tp) and not is_null else parse_value(raw)
    return out


# ---- typed construction ---------------------------------------------------------------------------


def from_dict(cls: type, d: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a dict whose values are checked against the field annotations.

    ``path`` is where ``cls`` sits in the enclosing config ("" at the top); every error names a full
    dotted path as :attr:`ConfigError.field`.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"expected a table/object, got {type(d).__name__}", path or cls.__name__)
    types_ = _field_types(cls)
    unknown = sorted(set(d) - set(types_))
    if len(unknown) == 1:
        raise _unknown_field(path, unknown[0], types_)
    if unknown:
        raise ConfigError(f"unknown fields {unknown}; allowed: {sorted(types_)}", path or cls.__name__)
    kwargs = {name: _convert(types_[name], value, f"{path}.{name}" if path else name) for name, value in d.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise exc.under(path, getattr(cls, "config_section", None)) from None


def _type_name(tp: Any) -> str:
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, field: str) -> Any:
    """``value`` checked (and, for tuples/floats/nested tables, converted) against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"must not be null; expected {' | '.join(map(_type_name, args))}", field)
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            return _convert(arms[0], value, field)
        for arm in arms:
            try:
                return _convert(arm, value, field)
            except ConfigError:
                continue
        raise ConfigError(f"expected {' | '.join(map(_type_name, args))}, got {value!r}", field)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"must be one of {allowed}, got {value!r}", field)
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, field)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"expected a list, got {value!r}", field)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"expected a list of {len(args)} items, got {list(value)!r}", field)
            items = [_convert(a, v, field) for a, v in zip(args, value, strict=True)]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, field) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a table/object, got {value!r}", field)
        val_tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {k: _convert(val_tp, v, f"{field}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"expected float, got {value!r}", field)
        if not math.isfinite(value):
            raise ConfigError(f"must be a finite number, got {value!r}", field)
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"expected int, got {value!r}", field)
    if tp in (str, bool) and not isinstance(value, tp):
        raise ConfigError(f"expected {tp.__name__}, got {value!r}", field)
    return value


def to_jsonable(obj: Any) -> Any:
    """Dataclasses -> dicts and tuples -> lists, recursively (the inverse of :func:`from_dict`)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    return obj


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths where two config dicts differ (for resume checks)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
