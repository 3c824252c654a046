"""A run's two clocks: wall time, and training time (steps only, over all sessions).

Wall time runs from the moment a session starts (setup, data, checkpoints, everything).
Training time runs from the loop's first step; `paused()` stops it for evaluation and
checkpoints, so what it counts is the steps with their data loading and logging. Both carry
over a resume through `state_dict`. Read them after the device has finished its work
(a `.item()`), or they measure what was queued rather than what was done.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    def __init__(self) -> None:
        self.session_start = time.perf_counter()
        self.wall_before = 0.0  # earlier sessions' wall time (a resume's)
        self.counted = 0.0  # training seconds up to `running_since`
        self.running_since: float | None = None  # None: the training clock is stopped
        self.lap_seconds, self.lap_samples = 0.0, 0  # at the last rate's end

    @property
    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.session_start

    @property
    def train_seconds(self) -> float:
        running = 0.0 if self.running_since is None else time.perf_counter() - self.running_since
        return self.counted + running

    def start(self, samples: int) -> None:
        """Run the training clock; `samples` (those seen so far) opens the first rate's window."""
        self.running_since = time.perf_counter()
        self.lap_seconds, self.lap_samples = self.counted, samples

    def stop(self) -> None:
        """Stop the training clock (again: nothing)."""
        self.counted = self.train_seconds
        self.running_since = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The training clock stopped for the block; it runs again after it (not on an error:
        a failure ends the run, and the time before it is what the summary reports)."""
        self.stop()
        yield
        self.running_since = time.perf_counter()

    def samples_per_s(self, samples: int) -> float:
        """Samples per training second since the last call (or `start`); samples: all seen."""
        seconds = self.train_seconds
        rate = (samples - self.lap_samples) / max(seconds - self.lap_seconds, 1e-9)
        self.lap_seconds, self.lap_samples = seconds, samples
        return rate

    def state_dict(self) -> dict[str, float]:
        return {"train_seconds": self.train_seconds, "wall_seconds": self.wall_seconds}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.counted, self.wall_before = state["train_seconds"], state["wall_seconds"]
