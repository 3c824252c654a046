"""Does M#D follow its magnitude's M#M or its direction's D#D? A verdict with seed uncertainty.

For an off-diagonal cell M#D and its two diagonals, with each cell's seeds as the rows of an
array (one column for a final metric, one per shared step for a curve, already mapped through
`scale`):

    dist(X, Y) = mean over points t of |mean_s X(t) − mean_s Y(t)|
    a = dist(MD, MM), b = dist(MD, DD), g = dist(MM, DD)
    Δ = b − a                         (> 0: closer to the magnitude's M#M)
    s = mean over t of (mean_s MM(t) − mean_s DD(t))    (the diagonals' signed separation)
    f = min(a, b) − g / 2             (> 0: further from the nearer diagonal than half the gap)

Each cell's seeds are resampled with replacement, independently, `resamples` times (a
generator with a fixed seed, so the same runs give the same verdict), and the verdict reads the
95 % percentile intervals, in this order: s's interval holds 0: the diagonals are not
separated, nothing can be told; f's lies above 0: far from both; Δ's above 0: closer to M#M,
below 0: closer to D#D; otherwise: can't tell.

`of_seed_means` is the same bootstrap for the studies' comparisons of arms (graft/grid/studies.py):
a statistic of the arms' seed means with its 95 % interval.

Pure functions over numpy arrays; reading runs and writing the table is graft/grid/table.py's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000  # bootstrap resamples per judgement (experiment key verdict.resamples)
CURVE = "train/loss"  # the curve judged besides the final metrics (verdict.curve)
SEED = 0  # the bootstrap generator's seed: a table regenerates identically
LEVEL = 0.95  # the intervals' coverage
# Resampled seed means held at once (rows x points): bounds memory for long curves.
BLOCK = 1 << 22

# A judgement's outcome, as the tally counts it (NOT_SEPARATED counts as can't tell there).
MAGNITUDE, DIRECTION, FAR, NOT_SEPARATED, UNCLEAR = (
    "closer to M#M",
    "closer to D#D",
    "far from both",
    "not separated",
    "can't tell",
)


def log_scale(metric: str) -> bool:
    """Whether a curve of `metric` is compared on a log scale: losses and perplexities fall
    over orders of magnitude, so their differences are read as ratios."""
    name = metric.lower()
    return "loss" in name or "perplexity" in name


def scale(metric: str, values: np.ndarray) -> np.ndarray:
    """f(values): the log for a loss or perplexity (`log_scale`), the values otherwise."""
    values = np.asarray(values, dtype=float)
    if not log_scale(metric):
        return values
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(values)  # <= 0 gives -inf or nan: the caller refuses non-finite points


def distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean over the last axis (points) of |x − y|, for seed means x, y of shape (..., points)."""
    return np.abs(x - y).mean(axis=-1)


@dataclass(frozen=True)
class Estimate:
    """A statistic on the seeds as they are, and its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


@dataclass(frozen=True)
class Judgement:
    """One off-diagonal cell judged against its diagonals (see the module's formulas)."""

    to_magnitude: float  # a: distance to M#M
    to_direction: float  # b: distance to D#D
    gap: float  # g: distance between M#M and D#D
    delta: Estimate  # Δ = b − a
    separation: Estimate  # s
    far: Estimate  # f = min(a, b) − g/2
    verdict: str  # MAGNITUDE, DIRECTION, FAR, NOT_SEPARATED or UNCLEAR


def measures(md: np.ndarray, mm: np.ndarray, dd: np.ndarray) -> dict[str, np.ndarray]:
    """a, b, g, Δ, s and f from the three cells' seed means, each of shape (..., points)."""
    a, b, g = distance(md, mm), distance(md, dd), distance(mm, dd)
    return {
        "a": a,
        "b": b,
        "g": g,
        "delta": b - a,
        "separation": (mm - dd).mean(axis=-1),
        "far": np.minimum(a, b) - g / 2,
    }


def resampled_means(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The seed means of resamples: `indices` (resamples, seeds) rows of `values` (seeds,
    points), averaged; shape (resamples, points). As a product of counts with the values:
    one matrix product instead of gathering every resample's rows."""
    seeds = len(values)
    counts = (indices[:, :, None] == np.arange(seeds)).sum(axis=1)
    return counts @ values / seeds


def judge(
    md: np.ndarray,
    mm: np.ndarray,
    dd: np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Judgement:
    """The verdict on M#D from its seeds and its diagonals' (arrays of shape (seeds, points),
    already through `scale`; one point for a final metric).

    Every cell needs 2 or more seeds, all cells the same points, all values finite
    (ValueError otherwise: the caller says why a cell is not judged before calling this).
    """
    cells = [np.asarray(cell, dtype=float) for cell in (md, mm, dd)]
    for cell in cells:
        if cell.ndim != 2 or cell.shape[0] < 2 or cell.shape[1] != cells[0].shape[1]:
            raise ValueError(f"cells must be (seeds >= 2, points) alike, not {cell.shape}")
        if not np.isfinite(cell).all():
            raise ValueError("cells must hold finite values only")
    if resamples < 1 or cells[0].shape[1] == 0:
        raise ValueError(f"need resamples >= 1 and points >= 1 ({resamples}, {cells[0].shape})")
    observed = measures(*(cell.mean(axis=0) for cell in cells))
    # One generator per judgement, drawn in a fixed order (M#D, M#M, D#D): a cell's verdict
    # does not depend on which other cells the grid has.
    generator = np.random.default_rng(seed)
    indices = [generator.integers(0, len(cell), size=(resamples, len(cell))) for cell in cells]
    block = max(1, BLOCK // max(cell.size for cell in cells))
    drawn: dict[str, list[np.ndarray]] = {"delta": [], "separation": [], "far": []}
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        means = [resampled_means(c, i[start:stop]) for c, i in zip(cells, indices)]
        for name, values in measures(*means).items():
            if name in drawn:
                drawn[name].append(values)
    estimates = {
        name: Estimate(float(observed[name]), *interval(np.concatenate(parts)))
        for name, parts in drawn.items()
    }
    return Judgement(
        to_magnitude=float(observed["a"]),
        to_direction=float(observed["b"]),
        gap=float(observed["g"]),
        delta=estimates["delta"],
        separation=estimates["separation"],
        far=estimates["far"],
        verdict=decide(estimates["delta"], estimates["separation"], estimates["far"]),
    )


def decide(delta: Estimate, separation: Estimate, far: Estimate) -> str:
    """The rule, in order: diagonals not separated; far from both; closer to M#M or D#D;
    can't tell."""
    if holds_zero(separation):
        return NOT_SEPARATED
    if far.low > 0:
        return FAR
    if delta.low > 0:
        return MAGNITUDE
    if delta.high < 0:
        return DIRECTION
    return UNCLEAR


def on_shared_steps(
    cells: Sequence[Sequence[tuple[Sequence[int], Sequence[float]]]],
) -> tuple[list[int], list[np.ndarray]]:
    """Curves compared where all of them have a point: `cells` holds, per cell, one
    (steps, values) per seed; returned: the steps every seed of every cell logged (sorted),
    and per cell an array (seeds, those steps). A step logged twice counts its last value."""
    logged = [[dict(zip(steps, values)) for steps, values in cell] for cell in cells]
    curves = [set(curve) for cell in logged for curve in cell]
    shared = set.intersection(*curves) if curves else set()
    steps = sorted(shared)
    return steps, [
        np.array([[curve[step] for step in steps] for curve in cell], dtype=float).reshape(
            len(cell), len(steps)
        )
        for cell in logged
    ]


def of_seed_means(
    statistic: Callable[..., np.ndarray | float],
    samples: Sequence[Sequence[float]],
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Estimate:
    """statistic(mean of sample 1, mean of sample 2, ...) on the seeds as they are, with its
    95 % bootstrap percentile interval: each sample (one value per seed, 2 or more) resampled
    with replacement, independently, in the order given. The studies' comparisons of arms
    (a difference of means, the share of a gap closed) use it; `statistic` works elementwise
    on numpy arrays."""
    samples = [np.asarray(sample, dtype=float) for sample in samples]
    for sample in samples:
        if sample.ndim != 1 or len(sample) < 2 or not np.isfinite(sample).all():
            raise ValueError(f"each sample needs 2 or more finite values, not {sample}")
    if resamples < 1:
        raise ValueError(f"need resamples >= 1, not {resamples}")
    generator = np.random.default_rng(seed)
    means = [
        sample[generator.integers(0, len(sample), size=(resamples, len(sample)))].mean(axis=1)
        for sample in samples
    ]
    with np.errstate(divide="ignore", invalid="ignore"):
        observed = float(statistic(*(sample.mean() for sample in samples)))
        drawn = np.asarray(statistic(*means), dtype=float)
    return Estimate(observed, *interval(drawn))


def interval(drawn: np.ndarray) -> tuple[float, float]:
    """The LEVEL percentile interval of resampled values (a resample whose statistic is
    undefined, e.g. a ratio over 0, is left out)."""
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.nanpercentile(drawn, [tail, 100 - tail])
    return float(low), float(high)


def holds_zero(estimate: Estimate) -> bool:
    return estimate.low <= 0 <= estimate.high


@dataclass(frozen=True)
class Difference:
    """Two diagonal cells' difference of means, its standard error, and whether
    |difference| > 2 SE (the design's requirement that the diagonals differ)."""

    difference: float
    standard_error: float

    @property
    def separated(self) -> bool:
        return abs(self.difference) > 2 * self.standard_error


def standard_error(values: Sequence[float]) -> float:
    """The standard error of the mean: the sample standard deviation (n − 1) over √n."""
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1) / math.sqrt(len(values)))


def difference(x: Sequence[float], y: Sequence[float]) -> Difference:
    """mean(x) − mean(y) with SE √(se_x² + se_y²); x and y need 2 or more values each."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"need 2 or more values each, not {len(x)} and {len(y)}")
    return Difference(
        float(np.mean(x) - np.mean(y)), math.hypot(standard_error(x), standard_error(y))
    )
