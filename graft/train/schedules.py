"""Learning-rate schedules, per step, as multipliers of the optimizer's base lr.

Each schedule is a `torch.optim.lr_scheduler.LambdaLR` over a pure function of the step,
so it composes with any optimizer; on `graft.Graft` it scales M's lr, hence the grafted
step. Every schedule may start with a linear warmup from 0 over `warmup_steps`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from functools import partial

import torch

from graft.common.validation import (
    POSITIVE,
    UNIT_INTERVAL,
    Allowed,
    at_least,
    first_refused,
    is_integer,
    within,
)

SCHEDULES = ("constant", "step_decay", "linear", "cosine", "polynomial")


def lr_multiplier(
    step: int,
    *,
    name: str,
    max_steps: int,
    warmup_steps: int = 0,
    decay_rate: float = 0.1,
    decay_every: int = 1,
    milestones: Sequence[int] = (),
    final_ratio: float = 0.0,
    power: float = 1.0,
) -> float:
    """The factor on the base lr at `step` (0-based: the step about to be taken).

    constant:    1.
    step_decay:  decay_rate ** ⌊(step - warmup) / decay_every⌋ (stepwise exponential decay),
                 or, with milestones, decay_rate ** (number of milestones <= step).
    linear:      from 1 down to final_ratio at max_steps.
    cosine:      half a cosine from 1 down to final_ratio at max_steps.
    polynomial:  final_ratio + (1 - final_ratio)·(1 - progress)^power.
    During warmup every schedule is (step + 1) / warmup_steps instead.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    if name == "step_decay":
        if milestones:
            return decay_rate ** sum(step >= milestone for milestone in milestones)
        return decay_rate ** ((step - warmup_steps) // decay_every)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if name == "linear":
        return 1.0 - (1.0 - final_ratio) * progress
    if name == "cosine":
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "polynomial":
        return final_ratio + (1.0 - final_ratio) * (1.0 - progress) ** power
    raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")


def build_schedule(
    optimizer: torch.optim.Optimizer, name: str, max_steps: int, **options: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler on `optimizer` (call its `step()` after each optimizer step).

    options: warmup_steps, decay_rate, decay_every, milestones, final_ratio, power (see
    lr_multiplier).
    Raises ValueError (one line) for an unknown name or out-of-range option.
    """
    check_schedule(name, max_steps, **options)
    if "milestones" in options:
        options = {**options, "milestones": tuple(options["milestones"])}
    multiplier: Callable[[int], float] = partial(
        lr_multiplier, name=name, max_steps=max_steps, **options
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


# The options' defaults, as lr_multiplier takes them.
OPTION_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(lr_multiplier).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}

INCREASING_STEPS = Allowed(
    lambda v: all(is_integer(m) and m >= 0 for m in v) and list(v) == sorted(v),
    "increasing step numbers",
)


class ScheduleError(ValueError):
    """A schedule name or option out of range; `key` names the option (None: the name)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def check_schedule(name: str, max_steps: int, **options: float) -> None:
    """ScheduleError (one line) for an unknown name, an unknown option or a bad value."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    limits = {
        "max_steps": at_least(1, integer=True),
        "warmup_steps": within(0, max_steps, integer=True, high_name="max_steps"),
        "decay_rate": within(0, 1, open_low=True),
        "decay_every": at_least(1, integer=True),
        "milestones": INCREASING_STEPS,
        "final_ratio": UNIT_INTERVAL,
        "power": POSITIVE,
    }
    unknown = sorted(set(options) - set(limits))
    if unknown:
        raise ScheduleError(
            f"unknown schedule option {unknown[0]!r}; allowed: {', '.join(sorted(limits))}",
            unknown[0],
        )
    values = {"max_steps": max_steps, **OPTION_DEFAULTS, **options}
    key = first_refused(values, limits)
    if key is not None:
        raise ScheduleError(
            f"invalid schedule {key}={values[key]!r}; allowed: {limits[key].text}", key
        )
