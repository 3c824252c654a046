"""The figures of a grid's results folder, each drawn from its runs' own logs.

heatmap.png   the headline metric per cell (rows M, columns D): mean ± s.e.m. over seeds, on a
              colour range at least 4 × the largest s.e.m. wide, so cells that differ by less
              than the noise get near-identical colours.
curves.png    training loss over steps, one panel per magnitude M (a row of the grid), a line
              per direction D in D's colour (the same in every panel): the mean over seeds and
              a band from the lowest to the highest seed; M#M (plain M) thick and solid.
schedule.png  each grafted cell's implicit schedule ‖u_M‖/‖u_D‖, laid out as the grid: per
              tensor, divided by the run's lr schedule s(t) (which scales M's step and not
              D's) and relative to its own first logged value (the two learning rates,
              constant factors, divide out, so pairs compare), for the stem, a middle block
              and the head of the model and the median over all tensors; geometric mean over
              seeds, band from the lowest to the highest seed.

Each `*_figure` function returns a matplotlib Figure (its axes and legends are what tests
read); `write_plots` saves them. Figures are built without pyplot, so nothing needs a display
and no figure outlives its function; the same runs give the same PNG bytes.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graft.common.run_dir import METRICS, MODEL, cell_name, read_config
from graft.grid.experiment import Experiment
from graft.grid.tune import lower_is_better
from graft.train.metrics import read_metrics
from graft.train.recorded import Recorded, implicit_schedules

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from graft.grid.table import Cell

# matplotlib is imported where a figure is drawn: the CLIs that import this module (graft-grid,
# graft-table) start a second sooner, and a bad argument is answered before it loads.

DPI = 120
LOSS = "train/loss"
NOISE_WIDTHS = 4  # the heatmap's colour range spans at least this many times the largest s.e.m.
BAND_ALPHA = 0.18
BAND_LABEL = "band: lowest..highest seed"
CURVES_KEY = "colour = direction D, panel = magnitude M\nsolid = M#M (plain M), dashed = M#D"
SCHEDULE_AXIS = "‖u_M‖/‖u_D‖ ÷ lr schedule, relative to its first logged value"
ROLE_COLOURS = {"stem": "tab:blue", "middle block": "tab:orange", "head": "tab:green"}


def write_plots(results: Path, experiment: Experiment, cells: list[Cell]) -> None:
    """heatmap.png and curves.png into `results`; schedule.png too when a grafted cell logged
    its norms (trainer.log_norms_every > 0)."""
    save(heatmap_figure(experiment, cells), results / "heatmap.png")
    save(curves_figure(experiment, cells), results / "curves.png")
    schedule = schedule_figure(experiment, cells)
    if schedule is not None:
        save(schedule, results / "schedule.png")


def save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI)


# Curves over seeds.


@dataclass(frozen=True)
class Band:
    """One quantity over steps, across seeds: the centre line and the lowest and highest seed,
    at the steps every seed logged a finite value."""

    steps: np.ndarray
    centre: np.ndarray  # the mean over seeds (geometric for ratios)
    low: np.ndarray
    high: np.ndarray
    seeds: int


Curve = tuple[np.ndarray, np.ndarray]  # (steps, values) of one run


def across_seeds(curves: Sequence[Curve], geometric: bool = False) -> Band | None:
    """The curves' band over the steps all of them logged with finite values (positive ones,
    when `geometric`); None without such a step."""
    curves = [(steps, values) for steps, values in curves if len(steps)]
    if not curves:
        return None
    steps = reduce(np.intersect1d, [steps for steps, _ in curves])
    by_step = [dict(zip(s.tolist(), v.tolist())) for s, v in curves]
    table = np.array([[seed[step] for step in steps.tolist()] for seed in by_step], dtype=float)
    table = table.reshape(len(curves), len(steps))
    usable = np.isfinite(table) & (table > 0 if geometric else True)
    keep = usable.all(axis=0)
    if not keep.any():
        return None
    steps, table = steps[keep], table[:, keep]
    centre = np.exp(np.log(table).mean(axis=0)) if geometric else table.mean(axis=0)
    return Band(steps, centre, table.min(axis=0), table.max(axis=0), len(curves))


def metric_curves(run_dirs: Sequence[Path], metric: str = LOSS) -> list[Curve]:
    """`metric` over steps, one curve per run that logged any; a value that is not a number
    reads as NaN."""
    curves = []
    for run_dir in run_dirs:
        lines = [line for line in read_metrics(run_dir / METRICS) if metric in line]
        if lines:
            values = [
                v if isinstance(v := line[metric], int | float) else math.nan for line in lines
            ]
            curves.append((np.array([line["step"] for line in lines]), np.array(values, float)))
    return curves


def loss_curves(run_dirs: Sequence[Path]) -> list[Curve]:
    """train/loss over steps, one curve per run that logged any."""
    return metric_curves(run_dirs, LOSS)


def mean_loss_curve(run_dirs: list[Path]) -> tuple[list[int], np.ndarray] | None:
    """(steps, train/loss averaged over the runs), over the steps all of them logged."""
    band = across_seeds(loss_curves(run_dirs))
    return None if band is None else (band.steps.tolist(), band.centre)


def draw_band(axis: Axes, band: Band, colour: str, **line: object) -> Line2D:
    axis.fill_between(band.steps, band.low, band.high, color=colour, alpha=BAND_ALPHA, lw=0)
    return axis.plot(band.steps, band.centre, color=colour, **line)[0]


def seeds_note(finished: int, seeds: int) -> str:
    """'' when every seed finished, else how many did."""
    return "" if finished == seeds else f" ({finished} of {count(seeds, 'seed')})"


def count(number: int, thing: str) -> str:
    return f"{number} {thing}" + ("" if number == 1 else "s")


def band_handle() -> Patch:
    from matplotlib.patches import Patch

    return Patch(color="0.4", alpha=BAND_ALPHA + 0.1, label=BAND_LABEL)


def optimizer_colours(experiment: Experiment) -> dict[str, str]:
    """One colour per optimizer, the same in every panel and figure of the experiment."""
    import matplotlib

    names = list(dict.fromkeys([*experiment.directions, *experiment.magnitudes]))
    palette = "tab10" if len(names) <= 10 else "tab20"
    colours = matplotlib.colormaps[palette].colors
    return {
        name: matplotlib.colors.to_hex(colours[i % len(colours)]) for i, name in enumerate(names)
    }


def panel_grid(figure: Figure, rows: int, columns: int) -> np.ndarray:
    """rows x columns axes sharing x and a log y, every one with its own tick labels (a hidden
    neighbour must not take a visible panel's labels with it)."""
    axes = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    axes[0, 0].set_yscale("log")  # once: the panels share it
    for axis in axes.flat:
        axis.tick_params(labelbottom=True, labelleft=True, labelsize="small")
        axis.grid(True, which="major", alpha=0.3)
    return axes


def log_ticks(axes: np.ndarray) -> None:
    """The same y tick labels on every panel, once the data are drawn: the decades, and 2 and
    5 between them when the panels span under two decades, as plain numbers; no minor labels
    (matplotlib's own put them on some shared panels and not on others)."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    low, high = axes.flat[0].get_ylim()
    subs = (1.0, 2.0, 5.0) if math.log10(high / low) < 2 else (1.0,)
    for axis in axes.flat:
        axis.yaxis.set_major_locator(LogLocator(subs=subs))
        axis.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        axis.yaxis.set_minor_formatter(NullFormatter())


def label_steps(axes: np.ndarray) -> None:
    """'step' under the lowest shown panel of each column (a figure-wide label would sit
    where the legend goes)."""
    for column in axes.T:
        shown = [axis for axis in column if axis.get_visible() and axis.axison]
        if shown:
            shown[-1].set_xlabel("step")


def legend_columns(labels: Sequence[str], width: float) -> int:
    """As many legend columns as the figure's width (inches) holds for the longest label."""
    longest = max(len(label) for label in labels)
    return max(1, min(len(labels), int(width / (0.075 * longest + 0.7))))


# curves.png


def curves_figure(experiment: Experiment, cells: list[Cell]) -> Figure:
    """Training loss, one panel per magnitude M, a line per direction D (see the module)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    by_name = {cell.name: cell for cell in cells}
    colours = optimizer_colours(experiment)
    seeds = len(experiment.seeds)
    panels = len(experiment.magnitudes)
    columns = 2 if panels == 4 else min(panels, 3)
    rows = math.ceil(panels / columns)
    width = max(3.6 * columns + 0.6, 6.5)
    figure = Figure(figsize=(width, 2.8 * rows + 1.6), layout="constrained")
    axes = panel_grid(figure, rows, columns)
    for axis, m in zip(axes.flat, experiment.magnitudes):
        notes = []  # cells of this panel with fewer seeds than the experiment's
        for d in experiment.directions:
            cell = by_name[cell_name(m, d, True)]
            plain = m == d
            style = {"linestyle": "-" if plain else "--", "linewidth": 2.6 if plain else 1.3}
            band = across_seeds(loss_curves(cell.run_dirs))
            finished = 0 if band is None else band.seeds
            if finished != seeds:
                shown = f"{finished} of {count(seeds, 'seed')}" if finished else "no finished seed"
                label = f"{m}#{d}: {shown}"
                notes.append(Line2D([], [], color=colours[d], **style, label=label))
            if band is not None:
                draw_band(axis, band, colours[d], zorder=3 if plain else 2, **style)
        axis.set_title(f"magnitude M = {m}", fontsize="medium")
        if notes:
            axis.legend(handles=notes, fontsize="x-small", loc="upper right")
    spare = list(axes.flat)[panels:]
    for axis in spare:
        axis.axis("off")
    label_steps(axes)
    log_ticks(axes)
    handles = [
        Line2D([], [], color=colours[d], lw=2, label=f"D = {d}") for d in experiment.directions
    ]
    handles += [
        Line2D([], [], color="0.3", lw=2.6, label="M#M (plain M)"),
        Line2D([], [], color="0.3", lw=1.3, ls="--", label="M#D (grafted)"),
        band_handle(),
    ]
    key = {"handles": handles, "fontsize": "small", "title": CURVES_KEY, "title_fontsize": "small"}
    if spare:  # an empty slot of the grid holds the legend
        spare[0].legend(loc="center", **key)
    else:
        labels = [handle.get_label() for handle in handles]
        figure.legend(loc="outside lower center", ncols=legend_columns(labels, width), **key)
    figure.supylabel(f"{LOSS} (mean over seeds, log scale)", fontsize="medium")
    figure.suptitle(f"{experiment.name}: training loss, {count(seeds, 'seed')} per cell")
    return figure


# heatmap.png


def colour_limits(means: np.ndarray, sems: np.ndarray) -> tuple[float, float]:
    """(vmin, vmax) around the finite means, widened about their middle to at least
    NOISE_WIDTHS x the largest s.e.m.: differences within the noise then get near-identical
    colours, where the full colour range on a few tied values would make them look large."""
    finite = means[np.isfinite(means)]
    if not len(finite):
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    noise = sems[np.isfinite(sems)]
    span = max(high - low, NOISE_WIDTHS * float(noise.max()) if len(noise) else 0.0)
    if span == 0:  # one value and no noise known: any range shows it mid-scale
        span = abs(high) * 0.1 or 1.0
    middle = (low + high) / 2
    return middle - span / 2, middle + span / 2


def decimals(sems: np.ndarray) -> int:
    """Decimals that show the smallest s.e.m. to one significant digit (2 to 4)."""
    positive = sems[np.isfinite(sems) & (sems > 0)]
    if not len(positive):
        return 3
    return int(np.clip(-math.floor(math.log10(float(positive.min()))), 2, 4))


def luminance(rgba: Sequence[float]) -> float:
    """The colour's relative luminance (WCAG 2: linearised sRGB)."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def readable_on(rgba: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with a cell of that colour (a contrast ratio of
    at least 4.6 either way, above WCAG's 4.5 for text)."""
    shade = luminance(rgba)
    return "black" if (shade + 0.05) / 0.05 >= 1.05 / (shade + 0.05) else "white"


def heatmap_figure(experiment: Experiment, cells: list[Cell]) -> Figure:
    """The first metric per cell: mean ± s.e.m. over seeds, colour limits from colour_limits."""
    import matplotlib
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    metric = experiment.metrics[0]
    by_name = {cell.name: cell for cell in cells}
    shape = (len(experiment.magnitudes), len(experiment.directions))
    means, sems, counts = np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape, int)
    for i, m in enumerate(experiment.magnitudes):
        for j, d in enumerate(experiment.directions):
            values = by_name[cell_name(m, d, True)].values.get(metric) or []
            counts[i, j] = len(values)
            if values:
                means[i, j] = statistics.fmean(values)
            if len(values) > 1:
                sems[i, j] = statistics.stdev(values) / math.sqrt(len(values))
    vmin, vmax = colour_limits(means, sems)
    # The better end bright, whichever way the metric runs.
    cmap = matplotlib.colormaps["viridis_r" if lower_is_better(metric) else "viridis"]
    cmap = cmap.with_extremes(bad="0.88")  # a cell with no finished seed: grey
    norm = Normalize(vmin, vmax)
    width = max(1.5 * shape[1] + 2.8, 4.8)
    figure = Figure(figsize=(width, max(0.95 * shape[0] + 2.0, 3.6)), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(np.ma.masked_invalid(means), cmap=cmap, norm=norm, aspect="auto")
    axis.set_xticks(range(shape[1]), experiment.directions)
    axis.set_yticks(range(shape[0]), experiment.magnitudes)
    axis.set_xlabel("direction D")
    axis.set_ylabel("magnitude M")
    places = decimals(sems)
    seeds = len(experiment.seeds)
    size = "small" if max(shape) <= 5 else "x-small"
    for (i, j), mean in np.ndenumerate(means):
        cell = by_name[cell_name(experiment.magnitudes[i], experiment.directions[j], True)]
        if np.isnan(mean):
            text, colour = ("failed" if cell.failures else "not run"), "black"
        else:
            text = f"{mean:.{places}f}"
            text += f"\n± {sems[i, j]:.{places}f}" if counts[i, j] > 1 else "\n(1 seed)"
            if 1 < counts[i, j] != seeds:
                text += f"\nn = {counts[i, j]}"
            colour = readable_on(cmap(norm(mean)))
        axis.text(j, i, text, ha="center", va="center", color=colour, fontsize=size)
        if experiment.magnitudes[i] == experiment.directions[j]:
            axis.add_patch(
                Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", lw=2.0)
            )
    counted = sorted(set(counts[counts > 0].tolist()))
    over = count(seeds, "seed") + ("" if counted in ([seeds], []) else " (n where fewer)")
    figure.colorbar(image, ax=axis, label=f"{metric}, mean over {over}\n(brighter is better)")
    axis.set_title("cell: mean ± s.e.m. over seeds\noutlined: M#M (plain M)", fontsize="small")
    figure.suptitle(f"{experiment.name}: {metric}")
    return figure


# schedule.png


def block_of(name: str) -> str | None:
    """The repeated block a parameter sits in: its name up to the first numbered part
    ('layer3.0' for layer3.0.conv1.weight, 'bert.encoder.layer.1' for BERT's second layer)."""
    parts = name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return None


def tensor_roles(shapes: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """role -> parameter name, for the parameters in model order (named_parameters's, the order
    the trainer logs norms in) with their shapes. Only weights of 2 or more dimensions are
    chosen (never a bias or a norm's scale): the stem (the first: a ResNet's conv1, BERT's word
    embeddings), a middle block's first (the block halfway through the numbered blocks) and
    the head (the last: the classifier, the MLM head's dense layer)."""
    weights = [name for name, shape in shapes.items() if len(shape) >= 2]
    weights = [name for name in weights if not name.endswith("bias")]
    if not weights:
        return {}
    roles = {"stem": weights[0]}
    inner = weights[1:-1]
    blocks = list(dict.fromkeys(block for block in map(block_of, inner) if block is not None))
    if blocks:
        middle = blocks[len(blocks) // 2]
        roles["middle block"] = next(name for name in inner if block_of(name) == middle)
    elif inner:
        roles["middle block"] = inner[len(inner) // 2]
    if len(weights) > 1:
        roles["head"] = weights[-1]
    return roles


def saved_shapes(run_dir: Path) -> dict[str, list[int]] | None:
    """Parameter name -> shape, from the run's final weights (the safetensors header only);
    None when the run kept none."""
    from safetensors import safe_open

    path = run_dir / MODEL
    if not path.is_file():
        return None
    with safe_open(str(path), framework="np") as weights:
        names = weights.keys()  # a safe_open has keys() but cannot be iterated itself
        return {name: list(weights.get_slice(name).get_shape()) for name in names}


def relative(values: Sequence[float]) -> np.ndarray:
    """The values divided by the first finite positive one (NaN everywhere without one)."""
    values = np.asarray(values, dtype=float)
    usable = np.flatnonzero(np.isfinite(values) & (values > 0))
    return values / values[usable[0]] if len(usable) else np.full_like(values, np.nan)


def median_over_tensors(relatives: np.ndarray) -> np.ndarray:
    """Per step, the median over tensors that have a ratio there (NaN where none has)."""
    with warnings.catch_warnings():  # an all-NaN step is NaN, said once by the result
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(relatives, axis=0)


@dataclass
class Schedules:
    """One grafted cell's relative ratios, across its seeds: role (or 'median') -> Band."""

    bands: dict[str, Band]
    seeds: int  # the runs that logged norms


def schedule_free(run_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(steps, per tensor ‖u_M‖/‖u_D‖ ÷ s(t)): the schedule multiplies M's step and not D's,
    so without this a cosine or linear decay would show as the implicit schedule itself."""
    steps, ratios = implicit_schedules(run_dir)
    if not steps:
        return np.array([]), {}
    arrays = {name: np.array(values, dtype=float) for name, values in ratios.items()}
    recorded = Recorded(run_dir, np.array(steps), arrays, read_config(run_dir))
    return recorded.steps, recorded.schedule_free()


def cell_schedules(cell: Cell, roles: Mapping[str, str]) -> Schedules | None:
    runs = [schedule_free(run_dir) for run_dir in cell.run_dirs]
    runs = [(steps, ratios) for steps, ratios in runs if len(steps)]
    if not runs:
        return None
    curves: dict[str, list[Curve]] = {role: [] for role in [*roles, "median"]}
    for steps, ratios in runs:
        relatives = {name: relative(values) for name, values in ratios.items()}
        for role, name in roles.items():
            if name in relatives:
                curves[role].append((steps, relatives[name]))
        curves["median"].append((steps, median_over_tensors(np.array(list(relatives.values())))))
    bands = {role: across_seeds(found, geometric=True) for role, found in curves.items()}
    return Schedules({role: band for role, band in bands.items() if band is not None}, len(runs))


def logged_tensors(cells: list[Cell]) -> tuple[list[str], dict[str, list[int]] | None]:
    """The tensor names of the first grafted run with norms, in logged order, and their shapes
    (None when that run kept no model.safetensors)."""
    for cell in cells:
        for run_dir in cell.run_dirs if cell.magnitude != cell.direction else []:
            _, ratios = implicit_schedules(run_dir)
            if ratios:
                return list(ratios), saved_shapes(run_dir)
    return [], None


def schedule_figure(experiment: Experiment, cells: list[Cell]) -> Figure | None:
    """The implicit schedules of the grafted cells, as the grid (see the module); None when no
    grafted cell logged norms."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names, shapes = logged_tensors(cells)
    if not names:
        return None
    roles = tensor_roles({name: shapes[name] for name in names if name in shapes}) if shapes else {}
    by_name = {cell.name: cell for cell in cells}
    rows, columns = len(experiment.magnitudes), len(experiment.directions)
    width = max(2.9 * columns + 1.0, 6.5)
    figure = Figure(figsize=(width, 2.3 * rows + 2.0), layout="constrained")
    axes = panel_grid(figure, rows, columns)
    seeds = len(experiment.seeds)
    for (i, j), axis in np.ndenumerate(axes):
        m, d = experiment.magnitudes[i], experiment.directions[j]
        if m == d:  # plain M: nothing grafted
            axis.set_visible(False)
            continue
        schedules = cell_schedules(by_name[cell_name(m, d, True)], roles)
        title = f"{m}#{d}" + seeds_note(schedules.seeds if schedules else 0, seeds)
        axis.set_title(title, fontsize="medium")
        if schedules is None:
            axis.text(
                0.5,
                0.5,
                "no finished seed\nwith norms",
                ha="center",
                va="center",
                transform=axis.transAxes,
                fontsize="small",
                color="0.4",
            )
            continue
        for role, band in schedules.bands.items():
            median = role == "median"
            colour = "black" if median else ROLE_COLOURS[role]
            draw_band(axis, band, colour, lw=2.0 if median else 1.2, zorder=3 if median else 2)
        axis.axhline(1.0, color="0.5", lw=0.8, ls=":")
    handles = [
        Line2D([], [], color=ROLE_COLOURS[role], lw=1.2, label=f"{role}: {name}")
        for role, name in roles.items()
    ]
    handles += [
        Line2D([], [], color="black", lw=2.0, label=f"median over all {len(names)} tensors"),
        band_handle(),
        Line2D([], [], color="0.5", lw=0.8, ls=":", label="1: as at the first logged step"),
    ]
    if not roles:
        handles.append(Patch(color="none", label="(no model.safetensors: tensor roles unknown)"))
    labels = [handle.get_label() for handle in handles]
    figure.legend(
        handles=handles,
        loc="outside lower center",
        ncols=legend_columns(labels, width),
        fontsize="small",
        title="tensor (its role in the model); line: geometric mean over seeds",
        title_fontsize="small",
    )
    label_steps(axes)
    log_ticks(axes)
    figure.supylabel(SCHEDULE_AXIS, fontsize="medium")
    figure.suptitle(
        f"{experiment.name}: implicit step-size schedule of M on D\n"
        "rows: magnitude M, columns: direction D"
    )
    return figure
