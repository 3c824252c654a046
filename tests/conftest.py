"""What every test module shares: the markers and the fixtures.

Helper functions live in plain modules that tests import (tests never import each other):
tests/helpers.py (a small model, its batches and trajectory checks for the optimizer tests),
tests/runs.py (trainer runs: the CLI in a fresh process or `train()` in this one) and
tests/refusals.py (a user mistake refused in one line, with nothing written).

Markers (registered in pyproject.toml): `slow` for tests that take seconds, `distributed` for
those that start several processes, `compile` for those that compile a step. Every
`distributed` or `compile` test is also `slow`, so `pytest -m "not slow"` is the quick loop.

Under pytest-xdist (pyproject's `-n auto`) each worker gets its share of the cores for torch
and for the processes its tests start: torch's default, every core in every worker, would
oversubscribe them.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

IMPLY_SLOW = ("distributed", "compile")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core this process may run on (a container's or taskset's
    share), where xdist's own count, from psutil, is the host's physical cores."""
    return usable_cores()


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = str(max(1, usable_cores() // int(workers)))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(name) for name in IMPLY_SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def module_tmp(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Path]:
    """A folder for the runs a module's tests share, removed once they are done unless one
    failed: a session's finished runs (checkpoints of tens of MB each) would otherwise stay
    on disk until it ends (pyproject's tmp_path_retention_policy does this for tmp_path)."""
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    failed_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_log_handlers_left_behind() -> Iterator[None]:
    """Closes the logging handlers a test added to the root logger: Hydra's job logging,
    run in-process by a CLI test, adds a file handler on the run's train.log, which outlives
    the test's folder and would make every later log record fail."""
    before = list(logging.root.handlers)
    yield
    for handler in logging.root.handlers[:]:
        if handler not in before:
            logging.root.removeHandler(handler)
            handler.close()
