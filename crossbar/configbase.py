"""Typed, validated, JSON round-tripping configuration dataclasses.

Every configuration in xbarsim is a frozen dataclass deriving from :class:`Config`.
Validation runs on construction and raises :class:`ValueError` naming the field, the
value and what is allowed. ``to_dict``/``from_dict`` round-trip through plain JSON types
so that every result can record exactly the configuration that produced it, and
``with_path`` applies the dotted updates (``"adc.bits"``) that sweeps are written in.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Iterable, Optional


class Config:
    """Base for frozen configuration dataclasses."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for an invalid field; subclasses extend this."""

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Config) else value
        return out

    @classmethod
    def from_dict(cls, data: dict, path: str = "") -> "Config":
        if not isinstance(data, dict):
            raise ValueError(f"{path or cls.__name__}: expected a table of fields, got {data!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            where = f"{path}." if path else ""
            raise ValueError(
                f"unknown field {where}{unknown[0]} in {cls.__name__}; allowed: {', '.join(names)}"
            )
        kwargs = {}
        for name, value in data.items():
            sub = _config_type(hints[name])
            if sub is not None and not isinstance(value, Config):
                value = sub.from_dict(value, f"{path}.{name}" if path else name)
            kwargs[name] = value
        if not path:
            return cls(**kwargs)
        try:
            return cls(**kwargs)
        except ValueError as err:  # name where in the file the bad value sits
            raise ValueError(f"{path}: {err}") from None

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    # -- updates ----------------------------------------------------------------------
    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def with_path(self, path: str, value: Any) -> "Config":
        """Return a copy with the field at dotted ``path`` (e.g. ``"adc.bits"``) set.
        An invalid value raises ValueError naming the path as well as the field."""
        try:
            return self._with_path(path, value)
        except ValueError as err:
            raise ValueError(f"{path} = {value!r}: {err}") from None

    def _with_path(self, path: str, value: Any) -> "Config":
        head, _, rest = path.partition(".")
        names = [f.name for f in dataclasses.fields(self)]
        if head not in names:
            raise ValueError(
                f"unknown field {head!r} in {type(self).__name__} (path {path!r}); "
                f"allowed: {', '.join(names)}"
            )
        if rest:
            child = getattr(self, head)
            if not isinstance(child, Config):
                raise ValueError(f"{path!r}: {head!r} is a value, not a table of fields")
            value = child._with_path(rest, value)
        return self.replace(**{head: value})

    def get_path(self, path: str) -> Any:
        value: Any = self
        for part in path.split("."):
            if not isinstance(value, Config) or not hasattr(value, part):
                raise ValueError(f"unknown field path {path!r}")
            value = getattr(value, part)
        return value


def _config_type(hint) -> Optional[type]:
    """The Config subclass named by a type hint (also inside Optional[...])."""
    candidates = typing.get_args(hint) or (hint,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, Config):
            return c
    return None


# -- validators: each raises ValueError naming owner.field, the value and the rule ------

def _fail(owner: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{owner}.{name} = {value!r} is invalid: {allowed}")


def check_number(owner: str, name: str, value: Any, lo: float = -math.inf, hi: float = math.inf,
                 lo_open: bool = False, hi_open: bool = False, unit: str = "") -> float:
    """A finite real number in [lo, hi] (open ends where asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        _fail(owner, name, value, f"expected a finite number in {left}{lo}, {hi}{right}"
              + (f" {unit}" if unit else ""))
    return float(value)


def check_int(owner: str, name: str, value: Any, lo: int, hi: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
        _fail(owner, name, value, f"expected an integer in [{lo}, {hi}]" + (" or None" if optional else ""))


def check_choice(owner: str, name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        _fail(owner, name, value, f"expected one of {', '.join(repr(c) for c in choices)}")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(owner, name, value, "expected true or false")
