"""Small dataclass configs, loaded from YAML with `key=value` overrides.

    cfg = load_config(PretrainConfig, "run.yaml", ["optim.lr=3e-4", "model.n_layer=4"])

Nested dataclass fields are addressed with dots. Unknown keys are errors that name the key
and suggest close ones. Values given on the command line are parsed as YAML scalars
(`3e-4` -> float, `true` -> bool, `[1,2]` -> list).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import LLMKitError

T = TypeVar("T")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _dataclass_of(tp):
    """The dataclass type inside a hint such as `Foo` or `Foo | None`, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(value, tp, key: str):
    """The one number coercion of every config: YAML 1.1 reads `1e-3` (no dot) as a string and `3` as
    an int, so float fields get a float, int fields an int (`1e3` -> 1000); text that is no number is an
    error naming the key."""
    args = typing.get_args(tp)
    want = next((t for t in (float, int) if tp is t or t in args), None)
    if want is None or isinstance(value, bool) or value is None:
        return value
    if want is float and isinstance(value, (str, int)):
        try:
            return float(value)
        except ValueError:
            raise LLMKitError(f"config key {key!r} must be a number, got {value!r}") from None
    if want is int and isinstance(value, (str, float)) and float not in args:
        try:
            number = float(value)
        except ValueError:
            raise LLMKitError(f"config key {key!r} must be an integer, got {value!r}") from None
        if not number.is_integer():
            raise LLMKitError(f"config key {key!r} must be an integer, got {value!r}")
        return int(number)
    return value


# ---------------------------------------------------------------- ranges, declared with the field
_RULE = re.compile(r"^(?:(>=|>|<=|<)(-?[\d.e+-]+)|([\[(])(-?[\d.e+-]+),(-?[\d.e+-]+)([\])]))$")


def ranged(default, rule: str, **kw):
    """A dataclass field whose value (when not None) must satisfy `rule`: ">0", ">=0", "[0,1)", "(0,1]",
    "[1,65535]"... checked by `from_dict` with one line naming the key, the value and the range.

        lr: float | None = ranged(None, ">0")"""
    if not _RULE.match(rule):
        raise ValueError(f"bad range rule {rule!r}")
    if callable(default) and not isinstance(default, (int, float)):
        return dataclasses.field(default_factory=default, metadata={"range": rule}, **kw)
    return dataclasses.field(default=default, metadata={"range": rule}, **kw)


def _in_range(v, rule: str) -> bool:
    m = _RULE.match(rule)
    if m.group(1):
        op, bound = m.group(1), float(m.group(2))
        return {">": v > bound, ">=": v >= bound, "<": v < bound, "<=": v <= bound}[op]
    lo, hi = float(m.group(4)), float(m.group(5))
    return (v >= lo if m.group(3) == "[" else v > lo) and (v <= hi if m.group(6) == "]" else v < hi)


def check_value(key: str, value, rule: str | None) -> None:
    """Every number in a config is finite; one with a declared range lies in it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise LLMKitError(f"config key {key!r} must be a finite number, got {value}")
    if rule and not _in_range(value, rule):
        raise LLMKitError(f"config key {key!r} must be {_words(rule)}, got {value}")


def _words(rule: str) -> str:
    m = _RULE.match(rule)
    return f"{m.group(1)} {m.group(2)}" if m.group(1) else f"in {rule}"


def from_dict(cls: type[T], data: dict, where: str = "", base=None) -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys raise LLMKitError. Fields not in `data`
    keep the values of `base` (an instance of cls) if given, else cls's defaults: a recipe can give
    a shared section its own defaults (`field(default_factory=lambda: OptimSection(lr=3e-3))`)."""
    if not isinstance(data, dict):
        raise LLMKitError(f"config section {where or '<root>'} must be a mapping, got {type(data).__name__}")
    types = _field_types(cls)
    factories = {f.name: f.default_factory for f in dataclasses.fields(cls)
                 if f.default_factory is not dataclasses.MISSING}
    rules = {f.name: f.metadata.get("range") for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{where}{key}"
        if key not in types:
            raise LLMKitError(f"unknown config key {full!r}{_suggest(key, types)}")
        sub = _dataclass_of(types[key])
        if sub is not None and isinstance(value, dict):
            default = getattr(base, key) if base is not None else factories[key]() if key in factories else None
            value = from_dict(sub, value, where=f"{full}.",
                              base=default if dataclasses.is_dataclass(default) else None)
        elif sub is not None and value is not None and not dataclasses.is_dataclass(value):
            names = ", ".join(f.name for f in dataclasses.fields(sub))
            raise LLMKitError(f"config key {full!r} is a section (keys: {names}), got {value!r}")
        elif isinstance(value, dict) and key in factories:
            default = factories[key]()
            if isinstance(default, dict):  # a dict field: `model.dropout=0` changes one key, keeps the rest
                value = _merge(default, value)
        kwargs[key] = _coerce(value, types[key], full)
        check_value(full, kwargs[key], rules.get(key))
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except TypeError as e:
        raise LLMKitError(f"config {where or '<root>'}: {e}") from None


def _suggest(key: str, types: dict) -> str:
    """Close names at this level or one section down (`max_steps` -> `train.steps`), exact ones first."""
    import difflib

    names = {k: k for k in types}
    for name, tp in types.items():
        for f in dataclasses.fields(sub) if (sub := _dataclass_of(tp)) else ():
            names.setdefault(f.name, f"{name}.{f.name}")
    near = [key] if key in names else difflib.get_close_matches(key, list(names), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(names[n]) for n in near)}?)" if near else ""


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings to a nested dict (values parsed as YAML scalars)."""
    for item in overrides or []:
        if "=" not in item:
            raise LLMKitError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LLMKitError(f"override {key!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise LLMKitError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise LLMKitError(f"config file {p} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise LLMKitError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LLMKitError(f"config file {p} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """Defaults of `cls` <- `base` dict <- YAML file <- key=value overrides."""
    data: dict = {}
    if base:
        data = _merge(data, base)
    if path:
        data = _merge(data, load_yaml(path))
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
