"""Typed mappings: build dataclasses from parsed YAML with errors that name the key path and the expected type.

Used by recipes (`mcit.config`), method options, data cards (`mcit.data.cards`) and scorer options
(`mcit.evaluation.scorers`). A dataclass field whose type is itself a dataclass is a nested section, one typed
`list[SomeDataclass]` a list of them; `dict[str, Any]` fields are free-form. Field metadata tunes a field:
`NOT_A_KEY` for one set in code only, `FLATTEN` for a section whose keys may also be given one level up.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any

from mcit.errors import McitError

NOT_A_KEY = {"key": False}
"""Field metadata: the field is set in code (e.g. the file a card came from), never read from or written to a
mapping; a mapping that holds it gets the unknown-key error."""
FLATTEN = {"flatten": True}
"""Field metadata of a dataclass-typed field: its keys are also accepted one level up (`lowercase: false` for
`normalizer: {lowercase: false}`) and win over the nested mapping's."""


def suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        (item,) = typing.get_args(tp)
        return "a list of mappings" if dataclasses.is_dataclass(item) else f"a list of {type_name(item)}s"
    if origin is dict:
        return "a mapping"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "string", int: "integer", bool: "boolean", float: "number"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(matches, value) with the only coercion YAML needs: an int where a float is expected."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if tp is type(None):
        return value is None, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item,) = typing.get_args(tp)
        out = [_coerce(v, item) for v in value]
        return all(ok for ok, _ in out), [v for _, v in out]
    if origin is dict:
        return isinstance(value, dict), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def from_mapping(cls: type, data: Any, *, path: str = "", where: str = "", error: type[McitError] = McitError,
                 strict: bool = True) -> Any:
    """Instantiate dataclass `cls` from `data`, recursing into dataclass-typed fields.

    Raises `error` naming `where` (a file), the dotted key path, and what was expected. With `strict`, unknown keys are
    errors with the closest valid key suggested.
    """
    prefix = f"{where}: " if where else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{prefix}{path or 'recipe'}: expected a mapping, got {type(data).__name__} ({data!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in _keyed_fields(cls)}
    data = _unflatten(data, fields, hints, prefix, error)
    valid = [*fields, *(name for owner in fields.values() if owner.metadata.get("flatten")
                        for name in _keyed_field_names(hints[owner.name]) if name not in fields)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            if strict:
                raise error(f"{prefix}{dotted}: unknown key{suggest(str(key), valid)}; "
                            f"valid keys: {', '.join(valid) or 'none'}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_mapping(tp, value, path=dotted, where=where, error=error, strict=strict)
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise error(f"{prefix}{dotted}: expected {type_name(tp)}, got {type(value).__name__} ({value!r})")
            kwargs[key] = [_section(item, v, f"{dotted}[{i}]", where, error, strict) for i, v in enumerate(value)]
            continue
        ok, coerced = _coerce(value, tp)
        if not ok:
            raise error(f"{prefix}{dotted}: expected {type_name(tp)}, got {type(value).__name__} ({value!r})")
        kwargs[key] = coerced
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(f"{prefix}{f'{path}.{name}' if path else name}: required key is missing")
    return cls(**kwargs)


def _section(cls: type, value: Any, path: str, where: str, error: type[McitError], strict: bool) -> Any:
    """One item of a list of sections: a mapping is required (no `None` for an empty section, unlike a field)."""
    if not isinstance(value, dict):
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}{path}: expected a mapping, got {type(value).__name__} ({value!r})")
    return from_mapping(cls, value, path=path, where=where, error=error, strict=strict)


def _keyed_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls)
            if f.init and not f.name.startswith("_") and f.metadata.get("key", True)]


def _keyed_field_names(cls: type) -> list[str]:
    return [f.name for f in _keyed_fields(cls)]


def _unflatten(data: dict, fields: dict[str, dataclasses.Field], hints: dict[str, Any], prefix: str,
               error: type[McitError]) -> dict:
    """Move the keys of `FLATTEN` sections given one level up into their section (they override its own)."""
    out = dict(data)
    for name, f in fields.items():
        if not f.metadata.get("flatten"):
            continue
        moved = {k: out.pop(k) for k in list(out) if k in _keyed_field_names(hints[name]) and k not in fields}
        if not moved:
            continue
        section = out.get(name)
        if section is not None and not isinstance(section, dict):
            raise error(f"{prefix}{name}: expected a mapping (with {', '.join(moved)} given beside it), got "
                        f"{type(section).__name__} ({section!r})")
        out[name] = {**(section or {}), **moved}
    return out


def to_mapping(obj: Any) -> Any:
    """The inverse of `from_mapping`: plain dicts/lists (for writing the resolved recipe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.name.startswith("_") and f.metadata.get("key", True)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj
