"""A grafted run's implicit schedule, as the trainer recorded it.

With `trainer.log_norms_every=N` the trainer logs, every N steps, ‖u_M‖ and ‖u_D‖ of that
step per parameter (`norms/magnitude/<name>` and `norms/direction/<name>` in metrics.jsonl,
on the line of the step they belong to). Their ratio r_i(t) = ‖u_M‖/‖u_D‖ is what grafting
multiplies D's step by: the per-layer learning rate M imposes on D. Since Graft schedules M's
lr and never D's, r_i(t) already holds the run's schedule s(t): D's step at t was
lr_D · r_i(t) · (D's unit-lr step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graft.common.errors import UserError
from graft.common.run_dir import CONFIG, HYDRA, METRICS, read_config
from graft.train.metrics import read_metrics
from graft.train.optimizer import optimizer_specs
from graft.train.schedules import lr_multiplier

MAGNITUDE, DIRECTION = "norms/magnitude/", "norms/direction/"


def implicit_schedules(
    run_dir: Path, *, applied: bool = False
) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, {parameter: ‖u_M‖/‖u_D‖ at those steps}) from a run's norm lines; no steps for
    a run that was not grafted or logged no norms. A zero ‖u_D‖, or a tensor missing from a
    line (no gradient at that step), gives NaN there.

    applied: for a run grafted with granularity global, the one ratio every tensor was scaled
    by, √Σ‖u_M‖² / √Σ‖u_D‖² over the line's tensors, in place of each tensor's own.
    """
    lines = [line for line in read_metrics(run_dir / METRICS) if has_norms(line)]
    names = list(dict.fromkeys(key for line in lines for key in line if key.startswith(DIRECTION)))
    names = [name.removeprefix(DIRECTION) for name in names]
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for line in lines:
        if applied:
            total_m = math.sqrt(sum(line.get(MAGNITUDE + n, 0.0) ** 2 for n in names))
            total_d = math.sqrt(sum(line.get(DIRECTION + n, 0.0) ** 2 for n in names))
            shared = total_m / total_d if total_d > 0 else math.nan
        for name in names:
            direction = line.get(DIRECTION + name, 0.0)
            ratio = line[MAGNITUDE + name] / direction if direction > 0 else math.nan
            ratios[name].append(shared if applied and direction > 0 else ratio)
    return [line["step"] for line in lines], ratios


def has_norms(line: dict[str, Any]) -> bool:
    return any(key.startswith(DIRECTION) for key in line)


@dataclass
class Recorded:
    """The per-parameter ratios of one grafted run, with the config it ran."""

    run_dir: Path
    steps: np.ndarray  # the steps (1-based) whose norms were logged, increasing
    ratios: dict[str, np.ndarray]  # parameter name -> r_i at those steps
    config: dict[str, Any]  # the run's resolved config (.hydra/config.yaml)

    @property
    def pair(self) -> tuple[str, str]:
        return self.config["magnitude"]["name"], self.config["direction"]["name"]

    @property
    def direction_lr(self) -> float:
        """D's learning rate in that run: the base lr that makes lr · r_i(t) its step size."""
        return float(optimizer_specs(self.config)[1]["lr"])

    @property
    def warmup_steps(self) -> int:
        return int(self.config["schedule"].get("warmup_steps", 0))

    def schedule_multiplier(self, step: int) -> float:
        """The run's lr schedule at the 0-based step about to be taken."""
        schedule = dict(self.config["schedule"])
        name = schedule.pop("name")
        return lr_multiplier(
            step, name=name, max_steps=self.config["trainer"]["max_steps"], **schedule
        )

    def schedule_factors(self) -> np.ndarray:
        """s(t), the run's schedule multiplier at each recorded step (step t used s(t - 1))."""
        return np.array([self.schedule_multiplier(int(step) - 1) for step in self.steps])

    def schedule_free(self) -> dict[str, np.ndarray]:
        """q_i(t) = r_i(t) / s(t): the ratios with the run's own lr schedule divided out."""
        factors = self.schedule_factors()
        return {name: ratios / factors for name, ratios in self.ratios.items()}


def load_recorded(run_dir: Path, what: str = "RUN_DIR") -> Recorded:
    """The recorded schedule of the grafted run in run_dir; UserError (one line) when run_dir
    is not a run, was not grafted, or logged no norms."""
    if not (run_dir / CONFIG).exists():
        raise UserError(f"{what} {run_dir} is not a graft-train run directory (no {HYDRA}/)")
    config = read_config(run_dir)
    # Global grafting scaled every tensor by one ratio: that, not each tensor's, was applied.
    steps, ratios = implicit_schedules(run_dir, applied=config["graft"]["granularity"] == "global")
    if not steps:
        magnitude, direction = config["magnitude"]["name"], config["direction"]["name"]
        grafted = config["graft"]["enabled"] and magnitude != direction
        why = (
            "it logged no per-layer norms; train it with trainer.log_norms_every=N (N > 0)"
            if grafted
            else f"it was not grafted ({magnitude} alone); derive from an M#D run, e.g. "
            "optim@magnitude=adam optim@direction=sgd"
        )
        raise UserError(f"{what} {run_dir} has no ‖u_M‖/‖u_D‖ to read: {why}")
    return Recorded(
        run_dir=run_dir,
        steps=np.array(steps),
        ratios={name: np.array(values) for name, values in ratios.items()},
        config=config,
    )
