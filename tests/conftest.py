"""What every test module shares: the markers and the fixtures.

Helper functions live in plain modules that tests import (tests never import each other):
tests/helpers.py (a small model, its batches and trajectory checks for the optimizer tests),
tests/runs.py (trainer runs: the CLI in a fresh process or `train()` in this one) and
tests/refusals.py (a user mistake refused in one line, with nothing written).

Markers (registered in pyproject.toml): `slow` for tests that take seconds, `distributed` for
those that start several processes, `compile` for those that compile a step. Every
`distributed` or `compile` test is also `slow`, so `pytest -m "not slow"` is the quick loop.
"""

from __future__ import annotations

import pytest

IMPLY_SLOW = ("distributed", "compile")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(name) for name in IMPLY_SLOW):
            item.add_marker(pytest.mark.slow)
