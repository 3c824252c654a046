"""Allowed values, each said once: a test and the words an error message uses for it.

Every limit graft checks (a rule's hyperparameters, the trainer's keys, a schedule's options)
is an `Allowed`, made with the words below; `first_refused` finds the first value of a table
that its limit refuses, and the caller says where the value came from and how to fix it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Allowed:
    """Allowed values: a test, and what follows "allowed: " in a message ("an integer >= 1").

    comparison: whether `text` is a comparison (">= 0", "in [0, 1]") that reads after the
    key it limits ("lr >= 0"); other texts follow "KEY = " (`of`).
    """

    test: Callable[[Any], bool]
    text: str
    comparison: bool = False

    def accepts(self, value: Any) -> bool:
        """Whether `value` is allowed; a value of another type (a string where a number
        belongs, a list where a name does) is not."""
        try:
            return bool(self.test(value))
        except TypeError:
            return False

    def of(self, key: str) -> str:
        """The limit said of `key`: "lr >= 0", "betas = two values, each in [0, 1)"."""
        return f"{key} {self.text}" if self.comparison else f"{key} = {self.text}"

    def noting(self, note: str) -> Allowed:
        """The same values, with a note on what one of them means: "(0: never)"."""
        return Allowed(self.test, f"{self.text} ({note})", self.comparison)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def at_least(bound: float, *, integer: bool = False) -> Allowed:
    """>= bound ("an integer >= bound" when only integers are allowed)."""
    if integer:
        return Allowed(lambda v: is_integer(v) and v >= bound, f"an integer >= {bound}")
    return Allowed(lambda v: v >= bound, f">= {bound}", comparison=True)


def above(bound: float) -> Allowed:
    """> bound."""
    return Allowed(lambda v: v > bound, f"> {bound}", comparison=True)


def within(
    low: float,
    high: float,
    *,
    open_low: bool = False,
    open_high: bool = False,
    integer: bool = False,
    high_name: str | None = None,
) -> Allowed:
    """In the interval from low to high, each end closed unless said open: "in (0, 1]".
    high_name says where the upper end comes from: "an integer in [0, max_steps=10]"."""

    def test(v: Any) -> bool:
        if integer and not is_integer(v):
            return False
        return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

    upper = f"{high_name}={high}" if high_name else f"{high}"
    interval = f"{'(' if open_low else '['}{low}, {upper}{')' if open_high else ']'}"
    if integer:
        return Allowed(test, f"an integer in {interval}")
    return Allowed(test, f"in {interval}", comparison=True)


def one_of(choices: Iterable[str]) -> Allowed:
    """One of the named choices: "float32 or float64"."""
    names = tuple(choices)
    return Allowed(lambda v: v in names, " or ".join(names))


def optional(allowed: Allowed) -> Allowed:
    """null, or a value `allowed` accepts."""
    return Allowed(lambda v: v is None or allowed.test(v), f"null or {allowed.text}")


def pair_of(allowed: Allowed) -> Allowed:
    """Two values, each accepted by `allowed` ("two values, each in [0, 1)")."""
    return Allowed(
        lambda v: len(v) == 2 and all(allowed.test(x) for x in v),
        f"two values, each {allowed.text}",
    )


BOOLEAN = Allowed(lambda v: isinstance(v, bool), "true or false")
NON_NEGATIVE = at_least(0)
POSITIVE = above(0)
UNIT_INTERVAL = within(0, 1)


def first_refused(values: Mapping[str, Any], limits: Mapping[str, Allowed]) -> str | None:
    """The first key of `limits` (in its order) whose value in `values` it refuses; None when
    every value is allowed."""
    return next((key for key, allowed in limits.items() if not allowed.accepts(values[key])), None)
