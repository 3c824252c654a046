"""A static per-layer learning-rate correction derived from a grafted run (ICLR 2022, §5).

In M#D, D's step on tensor i at step t is lr_D · r_i(t) · (D's unit-lr step), with
r_i(t) = ‖u_M‖/‖u_D‖ holding the run's schedule s(t) (graft/train/recorded.py). The static
multiplier is the schedule-free part of that ratio, reduced over a window of steps:

    m_i = reduce over t in window of  r_i(t) / s(t)

so plain D with per-tensor learning rate lr_D · m_i under the same schedule takes steps of the
grafted run's size wherever r_i(t)/s(t) is steady, with no state of M's (Adam's second
moments) at all.

The default window starts after the warmup (with no warmup, after the first 10 % of the run)
and ends at the last logged step: the first steps are a transient (Adam's moment estimates
have seen few gradients and its early steps are near ±lr per coordinate), while the rest is
the steady state a single number per layer can stand in for. The median is the default
reduction: a few spiky steps do not move it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graft.common.errors import UserError
from graft.train.recorded import Recorded

REDUCTIONS = ("median", "mean")
SKIPPED_FRACTION = 0.1  # with no warmup, the default window skips this much of the run


def default_window(recorded: Recorded) -> tuple[int, int]:
    """(first, last) step: after the warmup, or after the first 10 % of a run without one."""
    max_steps = recorded.config["trainer"]["max_steps"]
    skip = recorded.warmup_steps or math.ceil(SKIPPED_FRACTION * max_steps)
    return skip + 1, int(recorded.steps[-1])


def parse_window(text: str | None, recorded: Recorded) -> tuple[int, int]:
    """'START:END' (steps, inclusive; either side may be left out) within the recorded steps."""
    if text is None:
        first, last = default_window(recorded)
    else:
        try:
            start, end = text.split(":")
            first = int(start) if start else int(recorded.steps[0])
            last = int(end) if end else int(recorded.steps[-1])
        except ValueError:
            raise UserError(
                f"--window {text!r} is not START:END in steps (e.g. 100:500, 100: or :500)"
            ) from None
    logged = f"the run's logged steps {int(recorded.steps[0])}..{int(recorded.steps[-1])}"
    if first > last or last < recorded.steps[0] or first > recorded.steps[-1]:
        raise UserError(f"--window {first}:{last} is outside {logged}; choose one inside it")
    if not ((recorded.steps >= first) & (recorded.steps <= last)).any():
        raise UserError(f"--window {first}:{last} holds none of {logged}; widen it")
    return first, last


def derive(recorded: Recorded, window: tuple[int, int], reduce: str = "median") -> dict[str, Any]:
    """The multipliers file's content: per-parameter m_i and how they were derived."""
    if reduce not in REDUCTIONS:
        raise UserError(f"--reduce {reduce!r} is unknown; allowed: {', '.join(REDUCTIONS)}")
    inside = (recorded.steps >= window[0]) & (recorded.steps <= window[1])
    reducer = np.median if reduce == "median" else np.mean
    multipliers, without = {}, []
    for name, free in recorded.schedule_free().items():
        values = free[inside][np.isfinite(free[inside])]
        multiplier = float(reducer(values)) if len(values) else 0.0
        if multiplier > 0:
            multipliers[name] = multiplier
        else:  # no gradient reached it in the window (‖u_D‖ or ‖u_M‖ = 0): any lr steps by 0
            multipliers[name] = 1.0
            without.append(name)
    magnitude, direction = recorded.pair
    return {
        "source": str(recorded.run_dir),
        "magnitude": magnitude,
        "direction": direction,
        "direction_lr": recorded.direction_lr,
        "schedule": recorded.config["schedule"],
        "window": list(window),
        "steps_used": int(inside.sum()),
        "reduce": reduce,
        "no_ratio": without,
        "multipliers": multipliers,
    }


def scaled(content: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """The multipliers times one global factor (D + static at `scale` times D's base lr): the
    correction moves every layer's lr, so D's own tuned lr need not be its best base. The
    file records the factor; at 1 it is the derived file unchanged."""
    if not (scale > 0 and math.isfinite(scale)):
        raise UserError(f"--scale {scale!r}; allowed: a finite number > 0")
    if scale == 1:
        return dict(content)
    multipliers = {name: value * scale for name, value in content["multipliers"].items()}
    return {**content, "scale": scale, "multipliers": multipliers}


def write_multipliers(path: Path, content: Mapping[str, Any]) -> None:
    """Write the file (under a temporary name, then renamed: never half-written); an existing
    one derived differently is refused, never overwritten."""
    text = json.dumps(content, indent=2) + "\n"
    if path.is_dir():
        raise UserError(
            f"{path} is a folder; give a file path for the multipliers (e.g. "
            f"--out {path / 'multipliers.json'})"
        )
    if path.exists() and path.read_text() != text:
        raise UserError(
            f"{path} already holds other multipliers; delete it, or write elsewhere "
            "(graft-static derive --out PATH)"
        )
    temporary = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise UserError(
            f"cannot write {path} ({error.strerror}: {error.filename}); choose another path"
        ) from None
