"""Studies of one M#D pair (an experiment with a `study:` block), run by graft-grid.

static (ICLR 2022, §5): M alone, D alone, M#D with its norms logged, then D with the static
    per-layer correction derived from M#D's first seed (graft-static derive). The table puts
    the four side by side with their optimizer state: does D + static recover M, with D's
    memory?
tuning_transfer: D alone at each of `lrs` (the sweep a new optimizer would need), M alone at its
    tuned lr, and M#D once at M's lr: does one grafted run match D's best tuned run?
schedule_trend (arXiv 2002.11803, SGD#AdaGrad): M#D with its norms logged; the schedule-free
    ratio ‖u_M‖/‖u_D‖ over steps, fitted linear and power law (graft/transfer/trend.py).

Each arm runs every seed in `outputs/<experiment>/<arm>/seed<k>/` (reruns skip finished runs);
the results go to `results/<experiment>/` (`-tuned/` after graft-grid --tune), written in one
piece once every arm has run (graft/grid/publish.py), with a "Failed runs" section naming each
failed seed's error.log.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from graft.common.run_dir import cell_name, read_summary, seed_folder
from graft.grid.experiment import Experiment
from graft.grid.launch import multirun
from graft.grid.plots import (
    across_seeds,
    band_handle,
    count,
    draw_band,
    loss_curves,
    save,
    seeds_note,
)
from graft.grid.publish import refuse_to_shrink, replace_folder, results_folder
from graft.grid.table import (
    Failure,
    Runs,
    Written,
    failure_lines,
    gather_runs,
    learning_rates_line,
    write_provenance,
)
from graft.grid.tune import lower_is_better
from graft.grid.verdict import holds_zero, log_scale, of_seed_means
from graft.train.recorded import load_recorded
from graft.transfer.static import derive, parse_window, scaled, write_multipliers
from graft.transfer.trend import fit_trend

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def run_arm(
    experiment: Experiment, shared: list[str], sweep_dir: Path, arm: str, choices: list[str]
) -> Runs:
    """Every seed of one arm (finished runs are skipped), then its gathered runs."""
    print(f"graft-grid: {experiment.name}: {arm}", flush=True)
    multirun(
        [
            *choices,
            f"trainer.seed={','.join(map(str, experiment.seeds))}",
            *shared,
            f"++logger.group={experiment.name}",
        ],
        sweep_dir,
        f"{arm}/{seed_folder('${trainer.seed}')}",
    )
    return gather_runs(sweep_dir / arm, experiment.seeds, experiment.metrics)


def plain(name: str) -> list[str]:
    return [f"optim@magnitude={name}", "graft=off"]


def grafted_pair(m: str, d: str) -> list[str]:
    return [f"optim@magnitude={m}", f"optim@direction={d}"]


Draw = Callable[[Path], None]  # writes a study's plots (and files) into a results folder
Study = tuple[str, dict[str, Runs], Draw]  # table.md's body, the arms by name, the plots


def run_study(
    experiment: Experiment,
    shared: list[str],
    sweep_dir: Path,
    results_root: Path,
    *,
    tuned: bool = False,
    force: bool = False,
    tuning: str | None = None,
) -> Written:
    """Run the experiment's study, then write its results folder (table.md, plots,
    provenance.json) in one piece; UserError if that folder holds more finished runs."""
    kind = experiment.study["kind"]
    run = {"static": static_study, "tuning_transfer": tuning_study, "schedule_trend": trend_study}
    body, arms, draw = run[kind](experiment, shared, sweep_dir)
    results = results_folder(results_root, experiment.name, tuned)
    finished = [path for runs in arms.values() for path in runs.run_dirs]
    total = len(arms) * len(experiment.seeds)
    redo = f"graft-grid {experiment.name}" + (" --tune" if tuned else "")
    refuse_to_shrink(results, len(finished), total, tuned=tuned, force=force, redo=redo)
    header, rest = body.split("\n", 1)
    lead = learning_rates_line(experiment, tuned, tuning, finished)
    table = "\n".join([header, "", lead, rest.lstrip("\n")])
    table += "\n".join(failure_lines(arms)) + ("\n" if failure_lines(arms) else "")

    def build(folder: Path) -> None:
        (folder / "table.md").write_text(table)
        draw(folder)
        write_provenance(folder, experiment, finished, tuned)
        if tuning is not None:
            (folder / "tuning.md").write_text(tuning)

    replace_folder(results, build, keep=["tuning.md"] if tuned else [])
    failures = [f"{arm} {failure}" for arm, runs in arms.items() for failure in runs.failures]
    return Written(results, len(finished), total, failures)


def state_bytes(runs: Runs) -> int | None:
    if not runs.run_dirs:
        return None
    return read_summary(runs.run_dirs[0])["optimizer_state_bytes"]


def headline(experiment: Experiment) -> str:
    return experiment.metrics[0]


def header(experiment: Experiment) -> list[str]:
    return [f"# {experiment.name}\n", experiment.description.strip() + "\n"]


def static_study(experiment: Experiment, shared: list[str], sweep_dir: Path) -> Study:
    m, d = experiment.magnitudes[0], experiment.directions[0]
    grafted = cell_name(m, d, True)
    arms = {
        m: run_arm(experiment, shared, sweep_dir, m, plain(m)),
        d: run_arm(experiment, shared, sweep_dir, d, plain(d)),
        grafted: run_arm(experiment, shared, sweep_dir, grafted, grafted_pair(m, d)),
    }
    scales = [float(scale) for scale in experiment.study.get("scales", [1])]
    source = sweep_dir / grafted / seed_folder(experiment.seeds[0])
    if source not in arms[grafted].run_dirs:  # nothing to derive from: the arms cannot run
        reason = f"not run: {grafted} seed {experiment.seeds[0]} did not finish"
        failures = [Failure(seed, reason, source) for seed in experiment.seeds]
        for scale in scales:
            arms[corrected_name(d, scale)] = Runs(
                {name: [] for name in experiment.metrics}, failures, [], 0
            )
        return unfinished_static(experiment, arms), arms, lambda folder: None
    recorded = load_recorded(source)
    window = parse_window(experiment.study.get("window"), recorded)
    content = derive(recorded, window, experiment.study.get("reduce", "median"))
    files = {}
    for scale in scales:
        name = corrected_name(d, scale)
        files[name] = sweep_dir / multipliers_file(scale)
        write_multipliers(files[name], scaled(content, scale))
        arms[name] = run_arm(
            experiment, shared, sweep_dir, name, [*plain(d), f"static={files[name].resolve()}"]
        )

    metric = headline(experiment)
    lines = header(experiment)
    lines.append(
        f"Multipliers: {len(content['multipliers'])} tensors, from {grafted} seed "
        f"{experiment.seeds[0]}, steps {window[0]}..{window[1]} ({content['reduce']}; "
        f"`multipliers.json`, `multipliers.png`)"
        + scales_note(d, scales)
        + f". Mean ± s.e.m. over seeds {experiment.seeds}.\n"
    )
    lines.append(
        "| run | " + " | ".join(experiment.metrics) + " | optimizer state | vs " + m + " |"
    )
    lines.append("|---|" + "---|" * (len(experiment.metrics) + 2))
    reference = state_bytes(arms[m])
    for arm, runs in arms.items():
        size = state_bytes(runs)
        ratio = f"{size / reference:.2f}x" if size is not None and reference else "-"
        shown = "-" if size is None else f"{size / 2**20:.2f} MiB"
        cells = " | ".join(runs.text(name, sem=True) for name in experiment.metrics)
        lines.append(f"| {arm} | {cells} | {shown} | {ratio} |")
    lines.append("")
    for name in files:
        lines.append(recovery(metric, arms[m], arms[d], arms[name], m, d, name) + "\n")

    def draw(folder: Path) -> None:
        for path in files.values():
            shutil.copyfile(path, folder / path.name)
        static_plots(folder, experiment, arms, content)

    return "\n".join(lines), arms, draw


def corrected_name(d: str, scale: float) -> str:
    """D + static as graft-train names such a run; at another scale, with its factor."""
    return f"{d}+static" if scale == 1 else f"{d}+static-x{scale:g}"


def multipliers_file(scale: float) -> str:
    return "multipliers.json" if scale == 1 else f"multipliers-x{scale:g}.json"


def scales_note(d: str, scales: list[float]) -> str:
    others = [scale for scale in scales if scale != 1]
    if not others:
        return ""
    factors = ", ".join(f"{scale:g}" for scale in others)
    files = ", ".join(f"`{multipliers_file(scale)}`" for scale in others)
    return f"; {d}+static-xS trains with every multiplier times S ({factors}: {files})"


def unfinished_static(experiment: Experiment, arms: dict[str, Runs]) -> str:
    """A static study's table when the grafted run to derive from did not finish."""
    lines = header(experiment)
    lines.append("No multipliers: the grafted run they derive from did not finish.\n")
    lines.append("| run | " + " | ".join(experiment.metrics) + " |")
    lines.append("|---|" + "---|" * len(experiment.metrics))
    for arm, runs in arms.items():
        lines.append(
            f"| {arm} | " + " | ".join(runs.text(m, sem=True) for m in experiment.metrics) + " |"
        )
    return "\n".join(lines) + "\n"


def recovery(
    metric: str, best: Runs, base: Runs, corrected: Runs, m: str, d: str, name: str
) -> str:
    """How much of the gap from D to M the correction closes, on the headline metric, each
    figure with its 95 % bootstrap interval over seeds (graft/grid/verdict.py of_seed_means):
    first whether M and D differ at all, then the share of their gap that D + static closes."""
    arms = {m: best, d: base, name: corrected}
    unjudged = not_judged(metric, arms)
    if unjudged:
        return f"Recovery on {metric}: {unjudged}."
    values = [arm.values[metric] for arm in arms.values()]
    top, bottom, fixed = (statistics.fmean(seeds) for seeds in values)
    gap = of_seed_means(lambda x, y: x - y, values[:2])
    if holds_zero(gap):
        return (
            f"On {metric}, {m} ({top:.4f}) and {d} ({bottom:.4f}) are not separated: "
            f"{m} − {d} = {gap} (95 % bootstrap interval over seeds holds 0), so at this scale "
            "there is no gap for the correction to close."
        )
    closed = of_seed_means(lambda x, y, z: (z - y) / (x - y), values)
    none, all_ = closed.low <= 0 <= closed.high, closed.low <= 1 <= closed.high
    reading = {
        (True, True): "the seeds cannot tell how much it closes",
        (True, False): "not distinguishable from closing none of it",
        (False, True): "not distinguishable from closing all of it",
        (False, False): "significantly more than none and less than all",
    }[none, all_]
    return (
        f"On {metric}, {m} − {d} = {gap} (95 % bootstrap interval over seeds); {name} "
        f"({fixed:.4f}) closes {percent(closed.value)} of the gap from {d} ({bottom:.4f}) to "
        f"{m} ({top:.4f}), interval [{percent(closed.low)}, {percent(closed.high)}]: {reading}."
    )


def not_judged(metric: str, arms: dict[str, Runs]) -> str | None:
    """Why arms cannot be compared (as the grid's verdict rule: any failed seed, or fewer
    than 2 finished), or None."""
    for name, runs in arms.items():
        finished = len(runs.values.get(metric) or [])
        if runs.failures or finished < 2:
            return (
                f"not judged: {name} has {len(runs.failures)} failed seed(s) and {finished} "
                "finished (needs every seed finished, 2 or more)"
            )
    return None


def percent(share: float) -> str:
    return f"{100 * share:.0f} %"


def static_plots(
    results: Path, experiment: Experiment, arms: dict[str, Runs], content: dict[str, Any]
) -> None:
    save(multipliers_figure(experiment, content), results / "multipliers.png")
    save(curves_figure(experiment, arms), results / "curves.png")


def multipliers_figure(experiment: Experiment, content: dict[str, Any]) -> Figure:
    """The derived multiplier of every tensor (one run's: the source the table names)."""
    from matplotlib.figure import Figure

    names = list(content["multipliers"])
    values = [content["multipliers"][name] for name in names]
    figure = Figure(figsize=(max(6.0, 0.16 * len(names) + 2), 4.8), layout="constrained")
    axis = figure.subplots()
    axis.bar(range(len(names)), values, color="tab:blue")
    axis.axhline(1.0, color="0.3", lw=0.8, ls=":")
    axis.set_yscale("log")
    axis.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    axis.set_ylabel("multiplier m_i (× D's base lr; dotted: 1)")
    pair = f"{content['magnitude']}#{content['direction']}"
    axis.set_title(
        f"{content['reduce']} over steps {content['window'][0]}..{content['window'][1]} of "
        f"{pair} {Path(content['source']).name}: one run, the source of multipliers.json",
        fontsize="small",
    )
    figure.suptitle(f"{experiment.name}: static per-layer correction from {pair}")
    return figure


def curves_figure(experiment: Experiment, arms: dict[str, Runs]) -> Figure:
    """Training loss of every arm: the mean over its seeds and a band from the lowest to the
    highest seed."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(8, 5), layout="constrained")
    axis = figure.subplots()
    seeds = len(experiment.seeds)
    handles = []
    for index, (arm, runs) in enumerate(arms.items()):
        band = across_seeds(loss_curves(runs.run_dirs))
        if band is None:
            handles.append(Line2D([], [], color=f"C{index}", label=f"{arm}: no finished seed"))
            continue
        line = draw_band(axis, band, f"C{index}", lw=1.6)
        line.set_label(arm + seeds_note(band.seeds, seeds))
        handles.append(line)
    axis.set(xlabel="step", ylabel="train/loss (mean over seeds, log scale)", yscale="log")
    axis.grid(True, alpha=0.3)
    axis.legend(handles=[*handles, band_handle()], fontsize="small")
    figure.suptitle(f"{experiment.name}: training loss, {count(seeds, 'seed')} per run")
    return figure


def tuning_study(experiment: Experiment, shared: list[str], sweep_dir: Path) -> Study:
    m, d = experiment.magnitudes[0], experiment.directions[0]
    lrs = list(experiment.study["lrs"])
    metric = headline(experiment)
    sweep = {}
    for lr in lrs:
        arm = f"{d}/lr{lr}"
        sweep[lr] = run_arm(
            experiment, shared, sweep_dir, arm, [*plain(d), f"++optimizers.{d}.lr={lr}"]
        )
    grafted = cell_name(m, d, True)
    own = run_arm(experiment, shared, sweep_dir, m, plain(m))
    transfer = run_arm(experiment, shared, sweep_dir, grafted, grafted_pair(m, d))
    finished = {
        lr: runs.mean(metric)
        for lr, runs in sweep.items()
        if runs.mean(metric) is not None and not runs.failures  # a failed seed: a failed lr
    }
    pick = min if lower_is_better(metric) else max
    best = pick(finished, key=finished.__getitem__) if finished else None
    m_lr = experiment.optimizers.get(m, {}).get("lr", "its configs/optim default")

    lines = header(experiment)
    lines.append(
        f"{d} tuned the usual way: {len(lrs)} learning rates x {len(experiment.seeds)} seeds. "
        f"{grafted}: one run per seed at {m}'s tuned lr ({m_lr}), {d}'s lr never searched. "
        f"Mean ± s.e.m. over seeds {experiment.seeds}.\n"
    )
    lines.append("| run | trials | " + " | ".join(experiment.metrics) + " |")
    lines.append("|---|---|" + "---|" * len(experiment.metrics))
    for lr, runs in sweep.items():
        mark = " **best**" if lr == best else ""
        cells = " | ".join(runs.text(name, sem=True) for name in experiment.metrics)
        lines.append(f"| {d} lr={lr}{mark} | 1 of {len(lrs)} | {cells} |")
    for label, runs in ((f"{m} (tuned)", own), (grafted, transfer)):
        cells = " | ".join(runs.text(name, sem=True) for name in experiment.metrics)
        lines.append(f"| {label} | 1 | {cells} |")
    lines.append("")
    lines.append(transfer_verdict(metric, sweep, best, transfer, d, grafted))
    lines.append(
        f"Trials saved: {len(lrs) - 1} of {len(lrs)} "
        f"({(len(lrs) - 1) * len(experiment.seeds)} runs over {len(experiment.seeds)} seeds)."
    )
    arms = {f"{d} lr={lr}": runs for lr, runs in sweep.items()}
    arms |= {m: own, grafted: transfer}
    return (
        "\n".join(lines) + "\n",
        arms,
        lambda folder: tuning_plot(folder, experiment, sweep, transfer, grafted),
    )


def transfer_verdict(
    metric: str, sweep: dict[float, Runs], best: float | None, transfer: Runs, d: str, grafted: str
) -> str:
    """Does the one grafted run match D's best tuned lr? The difference of their means with its
    95 % bootstrap interval over seeds; "no difference detected" when the interval holds 0.
    A best at either end of the sweep is flagged: a value beyond it might do better."""
    if best is None:
        return f"Not judged: no {d} learning rate has every seed finished."
    unjudged = not_judged(metric, {grafted: transfer, f"{d} lr={best}": sweep[best]})
    if unjudged:
        return unjudged[0].upper() + unjudged[1:] + "."
    grafted_values, tuned = transfer.values[metric], sweep[best].values[metric]
    gap = of_seed_means(lambda x, y: x - y, [grafted_values, tuned])
    if holds_zero(gap):
        verdict = "no difference detected (the interval holds 0)"
    elif (gap.value < 0) == lower_is_better(metric):
        verdict = f"{grafted} is better"
    else:
        verdict = f"{grafted} is worse"
    lines = [
        f"Best tuned {d}: lr={best}, {metric} {statistics.fmean(tuned):.4f}. Grafted {grafted}: "
        f"{statistics.fmean(grafted_values):.4f}. {grafted} − best {d} = {gap} (95 % bootstrap "
        f"interval over seeds): {verdict}. The best is picked on these same seeds, so its mean "
        "is slightly optimistic."
    ]
    ends = sorted(sweep)
    if len(ends) > 1 and best in (ends[0], ends[-1]):
        side = "smallest" if best == ends[0] else "largest"
        lines.append(
            f"Not bracketed: {d}'s best is the {side} lr of the sweep, so one beyond it might do "
            "better (add it to study.lrs)."
        )
    return " ".join(lines)


def tuning_plot(
    results: Path, experiment: Experiment, sweep: dict[float, Runs], transfer: Runs, grafted: str
) -> None:
    save(tuning_figure(experiment, sweep, transfer, grafted), results / "tuning.png")


def tuning_figure(
    experiment: Experiment, sweep: dict[float, Runs], transfer: Runs, grafted: str
) -> Figure:
    """D's metric at each learning rate (mean ± s.e.m. over seeds, as the table) against the
    one grafted run; a loss on a log scale, so that a diverged lr does not flatten the rest."""
    from matplotlib.figure import Figure

    metric = headline(experiment)
    d = experiment.directions[0]
    seeds = len(experiment.seeds)
    done = [(lr, runs) for lr, runs in sweep.items() if runs.mean(metric) is not None]
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    axis = figure.subplots()
    axis.errorbar(
        [lr for lr, _ in done],
        [runs.mean(metric) for _, runs in done],
        yerr=[runs.spread(metric, sem=True) for _, runs in done],
        marker="o",
        capsize=3,
        label=f"{d} alone, one trial per lr",
    )
    if transfer.mean(metric) is not None:
        mean, spread = transfer.mean(metric), transfer.spread(metric, sem=True)
        finished = len(transfer.values.get(metric) or [])
        note = seeds_note(finished, seeds)
        axis.axhline(mean, color="tab:red", label=f"{grafted}, one trial at M's lr{note}")
        axis.axhspan(mean - spread, mean + spread, color="tab:red", alpha=0.15, label="± s.e.m.")
    axis.set(xscale="log", xlabel=f"{d} learning rate")
    if log_scale(metric):
        axis.set_yscale("log")
    axis.set_ylabel(f"{metric} (mean ± s.e.m. over {seeds} seeds)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small")
    figure.suptitle(f"{experiment.name}: tuning {d} vs grafting its lr")
    return figure


def trend_study(experiment: Experiment, shared: list[str], sweep_dir: Path) -> Study:
    m, d = experiment.magnitudes[0], experiment.directions[0]
    grafted = cell_name(m, d, True)
    runs = run_arm(experiment, shared, sweep_dir, grafted, grafted_pair(m, d))
    trends = {run_dir.name: fit_trend(load_recorded(run_dir)) for run_dir in runs.run_dirs}
    lines = header(experiment)
    lines.append(
        f"q(t): the median over tensors of ‖u_{m}‖/‖u_{d}‖ divided by the lr schedule, "
        f"fitted per seed by least squares (R² on q for both fits; `trend.png`).\n"
    )
    lines.append(
        "| seed | q at first | q at last | linear slope / step | linear R² | power p | power R² |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for seed, trend in trends.items():
        lines.append(
            f"| {seed} | {trend.ratio[0]:.4g} | {trend.ratio[-1]:.4g} | {trend.slope:.4g} | "
            f"{trend.linear_r2:.3f} | {trend.power:.3f} | {trend.power_r2:.3f} |"
        )
    if trends:
        linear = np.mean([t.linear_r2 for t in trends.values()])
        power = np.mean([t.power_r2 for t in trends.values()])
        rising = all(t.slope > 0 for t in trends.values())
        lines.append(
            f"\nOver seeds: q {'rises' if rising else 'does not rise'} in every seed; mean R² "
            f"{linear:.3f} linear vs {power:.3f} power law (p = "
            f"{np.mean([t.power for t in trends.values()]):.3f}): "
            + ("a linear trend fits better" if linear > power else "a power law fits better")
            + ". The paper reports a linearly increasing correction."
        )
    lines.append("\nFinal metrics of the grafted run (mean ± s.e.m. over seeds):\n")
    lines.extend(f"- {metric}: {runs.text(metric, sem=True)}" for metric in experiment.metrics)
    return (
        "\n".join(lines) + "\n",
        {grafted: runs},
        lambda folder: trend_plot(folder, experiment, trends, grafted),
    )


def trend_plot(results: Path, experiment: Experiment, trends: dict[str, Any], grafted: str) -> None:
    save(trend_figure(experiment, trends, grafted), results / "trend.png")


def trend_figure(experiment: Experiment, trends: dict[str, Any], grafted: str) -> Figure:
    """q(t) of every seed (its colour) with its two fits (the line styles)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    axis = figure.subplots()
    for index, (seed, trend) in enumerate(trends.items()):
        colour = f"C{index}"
        axis.plot(trend.steps, trend.ratio, color=colour, lw=1.4, label=seed)
        axis.plot(trend.steps, trend.linear(trend.steps), color=colour, ls="--", lw=1)
        axis.plot(trend.steps, trend.power_law(trend.steps), color=colour, ls=":", lw=1)
    seeds = [line for line in axis.lines if not line.get_label().startswith("_")]
    styles = [
        Line2D([], [], color="0.3", lw=1.4, label="q(t) as logged"),
        Line2D([], [], color="0.3", ls="--", lw=1, label="linear fit"),
        Line2D([], [], color="0.3", ls=":", lw=1, label="power-law fit"),
    ]
    axis.legend(handles=[*seeds, *styles], fontsize="small", ncols=2, title="colour = seed")
    axis.set(xlabel="step", ylabel="q(t): median over tensors of ‖u_M‖/‖u_D‖ ÷ schedule")
    axis.grid(True, alpha=0.3)
    figure.suptitle(f"{experiment.name}: {grafted}, the schedule-free ratio and its fits")
    return figure
