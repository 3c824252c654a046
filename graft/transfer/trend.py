"""The trend of an implicit schedule over steps (arXiv 2002.11803: SGD#AdaGrad's correction).

The schedule-free ratio q(t) = median over tensors of r_i(t)/s(t) (r_i = ‖u_M‖/‖u_D‖, s the
run's lr schedule) is fitted two ways, each by least squares:

    linear:     q(t) ≈ a + b·t
    power law:  q(t) ≈ c·t^p      (a line in log q against log t)

R² of each (both measured on q itself) says which describes the run better: the paper
reports a linearly increasing correction for SGD#AdaGrad; p = 1/2 would be AdaGrad's 1/√t
decay undone exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graft.train.recorded import Recorded


@dataclass
class Trend:
    steps: np.ndarray
    ratio: np.ndarray  # q(t): the median over tensors of the schedule-free ratio
    intercept: float  # linear: a
    slope: float  # linear: b, per step
    linear_r2: float
    power: float  # power law: p
    scale: float  # power law: c
    power_r2: float

    def linear(self, steps: np.ndarray) -> np.ndarray:
        return self.intercept + self.slope * steps

    def power_law(self, steps: np.ndarray) -> np.ndarray:
        return self.scale * steps.astype(float) ** self.power


def r_squared(observed: np.ndarray, fitted: np.ndarray) -> float:
    total = float(np.sum((observed - observed.mean()) ** 2))
    return 1.0 - float(np.sum((observed - fitted) ** 2)) / total if total > 0 else 1.0


def schedule_free_median(recorded: Recorded) -> np.ndarray:
    """q(t): per step, the median over tensors of r_i(t)/s(t) (tensors with ‖u_D‖ = 0 left out)."""
    ratios = np.array(list(recorded.ratios.values())) / recorded.schedule_factors()
    return np.nanmedian(ratios, axis=0)


def fit_trend(recorded: Recorded) -> Trend:
    steps = recorded.steps.astype(float)
    ratio = schedule_free_median(recorded)
    keep = np.isfinite(ratio) & (ratio > 0)
    steps, ratio = steps[keep], ratio[keep]
    slope, intercept = np.polyfit(steps, ratio, 1)
    power, log_scale = np.polyfit(np.log(steps), np.log(ratio), 1)
    trend = Trend(
        steps=steps,
        ratio=ratio,
        intercept=float(intercept),
        slope=float(slope),
        linear_r2=0.0,
        power=float(power),
        scale=float(np.exp(log_scale)),
        power_r2=0.0,
    )
    trend.linear_r2 = r_squared(ratio, trend.linear(steps))
    trend.power_r2 = r_squared(ratio, trend.power_law(steps))  # in q, as the linear fit's
    return trend
