"""`schedule=replay`: a grafted run's whole per-layer schedule, applied to a plain optimizer.

Tensor i's learning rate at step t is lr · r_i(t), with r_i the run's recorded ‖u_M‖/‖u_D‖
(graft/train/recorded.py). Between logged steps (and before the first) the schedule-free
part q_i = r_i / s is interpolated linearly (held flat outside), and the recorded run's own
schedule s is applied exactly, so a warmup or a step decay between logged steps is not smeared.
With lr the recorded run's D learning rate and D as the plain optimizer, the replay takes the
grafted run's steps: with norms logged every step it retraces that run (to rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from graft.common.errors import UserError
from graft.train.recorded import load_recorded


def ratio_at(
    step: int, steps: np.ndarray, free: np.ndarray, schedule: Callable[[int], float]
) -> float:
    """r at the 0-based step about to be taken (logged on line step + 1): q interpolated,
    times the recorded run's schedule at that step."""
    return float(np.interp(step + 1, steps, free)) * schedule(step)


def unscaled(step: int) -> float:
    return 1.0


def replay_multipliers(
    run_dir: str | Path, names: list[str], max_steps: int
) -> list[Callable[[int], float]]:
    """One LambdaLR function per name (the optimizer's one-tensor param groups, in order)."""
    where = f"schedule.run={run_dir}"
    recorded = load_recorded(Path(run_dir), what="schedule.run")
    missing = [name for name in names if name not in recorded.ratios]
    if missing:
        raise UserError(
            f"{where}: the run recorded no norms for {', '.join(missing[:3])}; replay a run "
            "of the same task and model"
        )
    last = int(recorded.steps[-1])
    if max_steps > last:
        raise UserError(
            f"{where} recorded steps up to {last}, fewer than trainer.max_steps={max_steps}; "
            f"set trainer.max_steps<={last}"
        )
    schedule_free = recorded.schedule_free()
    functions: list[Callable[[int], float]] = []
    for name in names:
        free = schedule_free[name]
        finite = np.isfinite(free)
        if not finite.any():  # ‖u_D‖ was 0 throughout: no step to scale
            functions.append(unscaled)
            continue
        functions.append(
            partial(
                ratio_at,
                steps=recorded.steps[finite],
                free=free[finite],
                schedule=recorded.schedule_multiplier,
            )
        )
    return functions
