"""`schedule=replay`: a grafted run's whole per-layer schedule, applied to a plain optimizer.

Tensor i's learning rate at step t is lr · r_i(t), with r_i the run's recorded ‖u_M‖/‖u_D‖
(graft/transfer/recorded.py) interpolated linearly between logged steps. With lr the
recorded run's D learning rate and D as the plain optimizer, the replay takes the grafted
run's steps: with norms logged every step it retraces that run (to rounding), and with norms
logged every N steps it follows the schedule's interpolation.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from graft.train.errors import UserError
from graft.transfer.recorded import load_recorded


def ratio_at(step: int, steps: np.ndarray, ratios: np.ndarray) -> float:
    """r at the 0-based step about to be taken (logged on line step + 1), interpolated."""
    return float(np.interp(step + 1, steps, ratios))


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
    functions = []
    for name in names:
        ratios = recorded.ratios[name]
        finite = np.isfinite(ratios)
        if not finite.any():  # ‖u_D‖ was 0 throughout: no step to scale
            functions.append(lambda step: 1.0)
            continue
        functions.append(partial(ratio_at, steps=recorded.steps[finite], ratios=ratios[finite]))
    return functions
