"""The check behind the readers of the JSON files the commands write (``metrics.json``, ``bench.json``,
``summary.json``, ``history.json``).

Each file's layout is a :class:`typing.TypedDict` defined where the file is written
(:class:`dota.evaluate.MetricsFile`, :class:`dota.bench.BenchFile`, :class:`dota.train.TrainSummary`); a
dataclass stands for a dict with all its fields. :func:`read_json` parses a file and checks it against such
a type: every key present (unless ``NotRequired``), every value of its type. Keys a type does not name are allowed (a
newer writer may add some) and never read. A problem is one :class:`~dota.errors.DataFileError` line
naming the file and the key, e.g. ``run/summary.json: key history[2].val_loss is missing``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any

from dota.errors import DataFileError


class _Bad(Exception):
    """A value that does not match its type: where it is (``key``) and what is wrong."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key, self.problem = key, problem


def read_json(path: str | Path, schema: Any, version: int | None = None) -> Any:
    """``path`` parsed and checked against ``schema`` (a TypedDict, dataclass or ``list[...]`` of one).

    With ``version``, the file's top-level ``version`` key must equal it. Raises
    :class:`~dota.errors.DataFileError` with one line naming the file and the missing or bad key.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFileError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFileError(f"{path} could not be read ({type(exc).__name__}: {exc})") from None
    if version is not None and isinstance(data, dict):
        found = data.get("version")
        if found is None:
            raise DataFileError(f"{path}: key version is missing (written by an older dota; write it again)")
        if found != version:
            raise DataFileError(f"{path}: version {found!r}, but this dota reads version {version}")
    try:
        _check(data, schema)
    except _Bad as bad:
        raise DataFileError(f"{path}: key {bad.key or '(top level)'} {bad.problem}") from None
    return data


def _check(value: Any, schema: Any, key: str = "") -> None:
    """Raise :class:`_Bad` where ``value`` does not match ``schema``."""
    origin = typing.get_origin(schema)
    if schema is Any:
        return
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(schema)
        for option in options:
            try:
                _check(value, option, key)
                return
            except _Bad as bad:
                if bad.key != key:  # the value has the option's kind but something inside is wrong
                    raise
        raise _Bad(key, f"should be {' or '.join(_name(o) for o in options)}, got {_shown(value)}")
    if origin is list:
        _expect(isinstance(value, list), value, schema, key)
        (item,) = typing.get_args(schema)
        for i, v in enumerate(value):
            _check(v, item, f"{key}[{i}]")
        return
    if origin is dict:
        _expect(isinstance(value, dict), value, schema, key)
        _, item = typing.get_args(schema)
        for k, v in value.items():
            _check(v, item, _join(key, k))
        return
    fields = _fields(schema)
    if fields is not None:
        _expect(isinstance(value, dict), value, schema, key)
        hints, required = fields
        for k, tp in hints.items():
            if k in value:
                _check(value[k], tp, _join(key, k))
            elif k in required:
                raise _Bad(_join(key, k), "is missing")
        return
    if schema is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif schema is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif schema is type(None):
        ok = value is None
    else:
        ok = isinstance(value, schema)
    _expect(ok, value, schema, key)


@functools.cache
def _fields(schema: Any) -> tuple[dict[str, Any], frozenset[str]] | None:
    """(key -> type, required keys) of a TypedDict or dataclass; None for any other type."""
    if typing.is_typeddict(schema):
        # every key is required unless NotRequired, read from the hints: with postponed annotations
        # (PEP 563) Python 3.11 lists every key in __required_keys__
        hints = typing.get_type_hints(schema, include_extras=True)
        optional = {k for k, tp in hints.items() if typing.get_origin(tp) is typing.NotRequired}
        plain = {k: typing.get_args(tp)[0] if k in optional else tp for k, tp in hints.items()}
        return plain, frozenset(hints) - optional
    if dataclasses.is_dataclass(schema):
        hints = typing.get_type_hints(schema)
        names = [f.name for f in dataclasses.fields(schema)]
        return {k: hints[k] for k in names}, frozenset(names)
    return None


def _expect(ok: bool, value: Any, schema: Any, key: str) -> None:
    if not ok:
        raise _Bad(key, f"should be {_name(schema)}, got {_shown(value)}")


_NAMES = {float: "a number", int: "an integer", str: "text", bool: "true or false", type(None): "null"}


def _name(schema: Any) -> str:
    origin = typing.get_origin(schema)
    if origin is list:
        return "a list"
    if origin is dict or _fields(schema) is not None:
        return "an object"
    return _NAMES.get(schema, getattr(schema, "__name__", str(schema)))


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _join(key: str, k: Any) -> str:
    return f"{key}.{k}" if key else str(k)
