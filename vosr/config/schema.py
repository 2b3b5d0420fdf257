"""Typed configuration machinery: dataclass sections, strict loading, overrides and self-documentation.

Every key is declared once with `option(default, doc, ...)`. Loading a mapping into a section checks
that each key exists (unknown keys fail with the closest valid names first), that each value has the declared
type, and that numbers are in range / strings among the allowed choices. Nothing here knows about VOSR; the
sections live in the sibling modules, the method's root `MethodConfig` in `vosr.config.root`, and the jobs' root
`Config` in jobkit/config.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A configuration that cannot be loaded; the message names the key and what is valid."""


def option(default: Any = dataclasses.MISSING, doc: str = "", *, ge: float | None = None,
           le: float | None = None, gt: float | None = None, lt: float | None = None,
           choices: typing.Sequence[Any] | None = None, factory: Any = None, secret: bool = False):
    """Declare one configuration key with its documentation and its valid range. `secret`: the value is a
    credential: never accepted as a command-line override, redacted wherever a config is written or logged."""
    if not doc:
        raise TypeError("every configuration key needs a doc string")
    meta = {"doc": doc, "ge": ge, "le": le, "gt": gt, "lt": lt, "choices": tuple(choices) if choices else None,
            "secret": secret}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        val = default
        return dataclasses.field(default_factory=lambda: typing.cast(Any, type(val))(val), metadata=meta)
    if dataclasses.is_dataclass(default):
        val = default
        return dataclasses.field(default_factory=lambda: dataclasses.replace(val), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _closest(name: str, valid: typing.Iterable[str]) -> list[str]:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=len(valid), cutoff=0.0)
    return close


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow the lossless int->float widening only."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple, typing.Sequence):
        return _coerce_sequence(value, tp, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return build(tp, value, prefix=key)
    if tp in _SCALARS:
        return _SCALARS[tp](value, key)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first member of the union that accepts the value (None only where the union holds None)."""
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _coerce_sequence(value: Any, tp: Any, key: str) -> Any:
    """list[X] / Sequence[X] / tuple[X, ...] item by item; a fixed tuple[X, Y] also by length."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
    origin, args = get_origin(tp), get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    inner = args[0] if args else Any
    out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(out) if origin is tuple else out


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected true/false, got {value!r}")


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _as_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


_SCALARS: dict[Any, Any] = {bool: _as_bool, float: _as_float, int: _as_int, str: _as_str}


def _check_range(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        close = _closest(str(value), [str(c) for c in choices])
        raise ConfigError(f"{key}: {value!r} is not valid; valid values (closest first): {close}")
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for bound, ok, word in (("ge", lambda a, b: a >= b, ">="), ("le", lambda a, b: a <= b, "<="),
                                ("gt", lambda a, b: a > b, ">"), ("lt", lambda a, b: a < b, "<")):
            b = meta.get(bound)
            if b is not None and not ok(v, b):
                raise ConfigError(f"{key}: {value!r} is out of range; it must be {word} {b}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type, data: typing.Mapping[str, Any] | None, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping, starting from `base` (an instance) or the declared defaults."""
    data = dict(data or {})
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            where = f"{prefix}." if prefix else ""
            raise ConfigError(
                f"unknown key '{where}{name}'; valid keys in {prefix or 'the top level'} (closest first): "
                f"{_closest(name, fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if name in data:
            value = data[name]
            current = getattr(base, name) if base is not None else None
            if dataclasses.is_dataclass(tp) and isinstance(value, dict):
                if current is None:
                    current = _default_of(f)
                value = build(tp, value, prefix=key, base=current)
            else:
                value = _coerce(value, tp, key)
            _check_range(value, f.metadata, key)
            kwargs[name] = value
        elif base is not None:
            kwargs[name] = getattr(base, name)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (tuples become lists) for YAML/JSON/MLflow."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (path, value); the value is parsed as YAML (numbers, lists, null, strings)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = value


def explain(cls: type, prefix: str = "", default_obj: Any = None) -> list[str]:
    """One line per key: dotted name, type, default and documentation."""
    lines: list[str] = []
    hints = _hints(cls)
    obj = default_obj if default_obj is not None else cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(tp):
            lines.append(f"[{key}]  {f.metadata.get('doc', '')}")
            lines.extend(explain(tp, key, value))
            continue
        rng = []
        for b, w in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if f.metadata.get(b) is not None:
                rng.append(f"{w}{f.metadata[b]}")
        if f.metadata.get("choices"):
            rng.append("one of " + ", ".join(map(str, f.metadata["choices"])))
        extra = f" ({'; '.join(rng)})" if rng else ""
        lines.append(f"  {key}: {_type_name(tp)} = {to_dict(value)!r}{extra}\n      {f.metadata.get('doc', '')}")
    return lines
