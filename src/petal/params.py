"""Declared parameter checks, after scikit-learn's `_parameter_constraints`.

An estimator or config declares one rule per parameter, on itself, and is checked
when it is built:

    @dataclass
    class Head(Validated):
        PARAMS: ClassVar[dict[str, Rule]] = {"epochs": Int(1), "dropout": Real(0, 1, high_open=True)}
        epochs: int = 15
        dropout: float = 0.5

A bad value raises `PetalError` (a `ValueError`) naming the parameter, what was
expected and what was got: "dropout: expected a number in [0, 1), got 'x'". Wrong
types are refused the same way, never as a stray `TypeError` from a comparison.
Rules between parameters (warmup <= epochs) go in `check_together`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral
from numbers import Real as RealNumber
from typing import Any, ClassVar

from petal.errors import PetalError


@dataclass(frozen=True, kw_only=True)
class Rule:
    """A declared expectation for one parameter. Subclasses say what they accept."""

    none_ok: bool = False  # None is accepted too
    what: str | None = None  # wording that replaces the generated one

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def ok(self, value: Any) -> bool:
        return (value is None and self.none_ok) or self.accepts(value)

    def __str__(self) -> str:
        return self.what or (self.describe() + (" or None" if self.none_ok else ""))


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _within(v: float, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (v <= low if low_open else v < low):
        return False
    return not (high is not None and (v >= high if high_open else v > high))


@dataclass(frozen=True)
class Int(Rule):
    """An integer (not a bool) in [low, high]."""

    low: int | None = None
    high: int | None = None

    def accepts(self, v: Any) -> bool:
        return isinstance(v, Integral) and not isinstance(v, bool) and _within(v, self.low, self.high, False, False)

    def describe(self) -> str:
        return f"an integer {_range(self.low, self.high, False, False)}".rstrip()


@dataclass(frozen=True)
class Real(Rule):
    """A finite number (int or float, not a bool) in the range; ends closed unless said open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, v: Any) -> bool:
        return (isinstance(v, RealNumber) and not isinstance(v, bool) and math.isfinite(v)
                and _within(v, self.low, self.high, self.low_open, self.high_open))

    def describe(self) -> str:
        return f"a number {_range(self.low, self.high, self.low_open, self.high_open)}".rstrip()


@dataclass(frozen=True)
class Bool(Rule):
    def accepts(self, v: Any) -> bool:
        return isinstance(v, bool)

    def describe(self) -> str:
        return "True or False"


@dataclass(frozen=True)
class Instance(Rule):
    """An instance of `cls`: a nested config, say."""

    cls: type

    def accepts(self, v: Any) -> bool:
        return isinstance(v, self.cls)

    def describe(self) -> str:
        name = self.cls.__name__
        return f"{'an' if name[:1] in 'AEIOU' else 'a'} {name}"


@dataclass(frozen=True, init=False)
class OneOf(Rule):
    values: tuple[Any, ...]

    def __init__(self, *values: Any) -> None:  # OneOf("auto", "onnx"), not OneOf(("auto", "onnx"))
        object.__setattr__(self, "values", values)

    def accepts(self, v: Any) -> bool:
        return any(v is x or (type(v) is type(x) and v == x) for x in self.values)

    def describe(self) -> str:
        return "one of " + ", ".join(map(repr, self.values))


def check_param(name: str, value: Any, rule: Rule) -> Any:
    """Raise PetalError naming the parameter, what was expected and what was got."""
    if not rule.ok(value):
        raise PetalError(f"{name}: expected {rule}, got {value!r}")
    return value


def check_params(obj: Any, rules: Mapping[str, Rule]) -> None:
    """Check each declared attribute of `obj` (a dataclass, usually) against its rule."""
    for name, rule in rules.items():
        check_param(name, getattr(obj, name), rule)


class Validated:
    """A dataclass that declares its parameter rules in `PARAMS` and is checked once built.

    Subclasses that need their own `__post_init__` (to resolve a default, say) call
    `super().__post_init__()` at its end.
    """

    PARAMS: ClassVar[Mapping[str, Rule]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every declared rule, then the rules between parameters."""
        check_params(self, self.PARAMS)
        self.check_together()

    def check_together(self) -> None:
        """Rules no single Rule states (between parameters, say); each parameter already passed its own."""


def env_int(name: str, default: int, low: int = 1) -> int:
    """An integer >= `low` from the environment variable `name`, else `default`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low:
        raise PetalError(f"{name}: expected an integer >= {low}, got {raw!r}")
    return value
