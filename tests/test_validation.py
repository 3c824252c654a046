"""The vocabulary of allowed values: each limit's test and the words its message uses."""

from __future__ import annotations

import pytest

from graft.common.validation import (
    BOOLEAN,
    NON_NEGATIVE,
    POSITIVE,
    UNIT_INTERVAL,
    at_least,
    first_refused,
    one_of,
    optional,
    pair_of,
    within,
)


@pytest.mark.parametrize(
    ("allowed", "good", "bad", "text"),
    [
        (NON_NEGATIVE, [0, 0.5], [-1e-9, "1"], ">= 0"),
        (POSITIVE, [1e-9], [0, None], "> 0"),
        (UNIT_INTERVAL, [0, 1], [1.5, -0.1], "in [0, 1]"),
        (within(0, 1, open_low=True), [1], [0], "in (0, 1]"),
        (at_least(1, integer=True), [1, 7], [0, 1.0, True], "an integer >= 1"),
        (
            within(0, 10, integer=True, high_name="max_steps"),
            [0, 10],
            [11, 2.5],
            "an integer in [0, max_steps=10]",
        ),
        (optional(at_least(1, integer=True)), [None, 2], [0], "null or an integer >= 1"),
        (
            pair_of(within(0, 1, open_high=True)),
            [(0.9, 0.999)],
            [(0.9, 1.0), (0.9,), 0.9],
            "two values, each in [0, 1)",
        ),
        (
            one_of(["float32", "float64"]),
            ["float64"],
            ["float16", ["float32"]],
            "float32 or float64",
        ),
        (BOOLEAN, [True, False], [1, "true"], "true or false"),
        (at_least(0, integer=True).noting("0: never"), [0], [-1], "an integer >= 0 (0: never)"),
    ],
)
def test_each_limit_accepts_what_its_text_says(allowed, good, bad, text):
    assert allowed.text == text
    assert all(allowed.accepts(value) for value in good)
    assert not any(allowed.accepts(value) for value in bad)  # a wrong type too: no TypeError


def test_a_limit_is_said_of_its_key():
    assert NON_NEGATIVE.of("lr") == "lr >= 0"
    assert UNIT_INTERVAL.of("dampening") == "dampening in [0, 1]"
    assert pair_of(within(0, 1, open_high=True)).of("betas") == "betas = two values, each in [0, 1)"


def test_the_first_refused_key_follows_the_limits_order():
    limits = {"a": POSITIVE, "b": NON_NEGATIVE, "c": BOOLEAN}
    assert first_refused({"a": 1, "b": 0, "c": True}, limits) is None
    assert first_refused({"c": "yes", "b": -1, "a": 1}, limits) == "b"
