"""`graft-table EXPERIMENT [--tuned] [--force]`: an experiment's runs gathered into results.

The untuned runs (outputs/<experiment>/) go to results/<experiment>/, with --tuned the runs
graft-grid --tune made (outputs/<experiment>/tuned/) to results/<experiment>-tuned/; the
folder is replaced in one piece, and never by fewer finished runs without --force
(graft/grid/publish.py).

Written there: table.md (rows M, columns D, mean ± s.e.m. over seeds, the paper's number beside
ours where known, and for every off-diagonal cell a verdict with seed uncertainty: closer to M#M,
closer to D#D, far from both or can't tell, on each metric and the training curve:
graft/grid/verdict.py),
table.csv, table.tex, heatmap.png (the headline metric), curves.png (training loss per cell),
schedule.png (per-layer ‖u_M‖/‖u_D‖ over steps: the implicit step-size schedule) and
provenance.json (git SHA, versions, hardware, wall time, every run's resolved config and the
optimizer settings it ran with). When the cells logged to W&B, the table and plots go there too
(graft/grid/wandb_table.py).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graft.common.cli_parser import Parser
from graft.common.errors import UserError, exit_with
from graft.common.provenance import commits, git_sha, versions
from graft.common.run_dir import (
    ERROR_LOG,
    METRICS,
    SEED_PREFIX,
    SUMMARY,
    cell_name,
    read_config,
    read_summary,
    seed_folder,
)
from graft.grid import publish
from graft.grid.experiment import Experiment, load_experiment
from graft.grid.plots import metric_curves, write_plots
from graft.grid.publish import RESULTS, refuse_to_shrink, replace_folder, results_folder
from graft.grid.tuning_record import record_budget, record_choices
from graft.grid.verdict import (
    CURVE,
    DIRECTION,
    FAR,
    MAGNITUDE,
    NOT_SEPARATED,
    RESAMPLES,
    UNCLEAR,
    Judgement,
    difference,
    judge,
    log_scale,
    on_shared_steps,
    scale,
)
from graft.grid.wandb_table import log_table


@dataclass(frozen=True)
class Failure:
    """One seed of a setting that did not finish: why, in a few words, and where to read more."""

    seed: int
    reason: str
    where: Path  # error.log when the trainer wrote one, else the run folder

    def __str__(self) -> str:
        return f"seed {self.seed}: {self.reason} ({self.where})"


@dataclass
class Runs:
    """The seeds of one setting (a grid cell, a study's arm): finished metrics, failures."""

    values: dict[str, list[float]]  # metric -> one value per finished seed
    failures: list[Failure]
    run_dirs: list[Path]  # the finished runs
    started: int  # how many of the seeds' run folders exist

    def mean(self, metric: str) -> float | None:
        values = self.values.get(metric) or []
        return statistics.fmean(values) if values else None

    def spread(self, metric: str, *, sem: bool = False) -> float:
        """The standard deviation over seeds, or with `sem` the standard error of their mean
        (std / √n); 0 with fewer than two."""
        values = self.values.get(metric) or []
        if len(values) < 2:
            return 0.0
        return statistics.stdev(values) / (math.sqrt(len(values)) if sem else 1)

    def text(self, metric: str, reference: float | None = None, *, sem: bool = False) -> str:
        """The mean ± std (± s.e.m. with `sem`); the failed seeds named briefly (their
        reasons: failure_lines)."""
        values = self.values.get(metric) or []
        seeds = ", ".join(str(failure.seed) for failure in self.failures)
        if not values:
            return f"failed (seed {seeds})" if self.failures else "not run"
        spread = f" ± {self.spread(metric, sem=sem):.4f}" if len(values) > 1 else ""
        shown = f"{statistics.fmean(values):.4f}{spread}"
        if reference is not None:
            shown += f" (paper {reference})"
        if self.failures:
            shown += f" (seed {seeds} failed)"
        return shown


REASON_LENGTH = 100  # characters of a failure's reason in a table; the rest is in error.log


def short(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no reason recorded"
    return line if len(line) <= REASON_LENGTH else line[: REASON_LENGTH - 3] + "..."


def failure_of(run_dir: Path, seed: int) -> Failure | None:
    """None for a finished run; otherwise why it is not, pointing at its error.log (the
    trainer's full reason, first line first) when there is one."""
    error_log = run_dir / ERROR_LOG
    where = error_log if error_log.is_file() else run_dir
    summary_path = run_dir / SUMMARY
    if summary_path.is_file():
        try:
            summary = read_summary(run_dir)
            status = summary["status"]
        except (OSError, ValueError, KeyError, TypeError):
            return Failure(seed, "summary.json is unreadable", summary_path)
        if status == "finished":
            return None
        return Failure(seed, short(str(summary.get("error") or status)), where)
    if error_log.is_file():
        try:
            reason = short(error_log.read_text(errors="replace"))
        except OSError:
            reason = "error.log is unreadable"
        return Failure(seed, reason, error_log)
    if run_dir.is_dir():
        return Failure(seed, "did not start or was killed (no summary.json, no error.log)", run_dir)
    return Failure(seed, "not run (no run folder)", run_dir)


def gather_runs(folder: Path, seeds: list[int], metrics: list[str]) -> Runs:
    """The runs folder/seed<k>/ for every seed."""
    runs = Runs({metric: [] for metric in metrics}, [], [], 0)
    for seed in seeds:
        run_dir = folder / seed_folder(seed)
        runs.started += run_dir.exists()
        failure = failure_of(run_dir, seed)
        if failure is not None:
            runs.failures.append(failure)
            continue
        summary = read_summary(run_dir)
        runs.run_dirs.append(run_dir)
        for metric in metrics:
            if metric in summary:
                runs.values[metric].append(summary[metric])
    return runs


def failure_lines(named: Mapping[str, Runs]) -> list[str]:
    """A "Failed runs" section: every failed seed of every setting, with where its full
    reason is; nothing when all finished."""
    lines = [
        f"- {name} seed {failure.seed}: {failure.reason} ({failure.where})"
        for name, runs in named.items()
        for failure in runs.failures
    ]
    return ["\n## Failed runs\n", *lines] if lines else []


@dataclass
class Cell(Runs):
    """One M#D cell's runs."""

    magnitude: str
    direction: str

    @property
    def name(self) -> str:
        return cell_name(self.magnitude, self.direction, True)


def gather(experiment: Experiment, sweep_dir: Path) -> list[Cell]:
    cells = []
    for magnitude, direction in experiment.cells():
        folder = sweep_dir / cell_name(magnitude, direction, True)
        runs = gather_runs(folder, experiment.seeds, experiment.metrics)
        cells.append(
            Cell(runs.values, runs.failures, runs.run_dirs, runs.started, magnitude, direction)
        )
    return cells


# What the tally counts, in its order (a verdict of NOT_SEPARATED counts as can't tell).
NOT_JUDGED = "not judged"
TALLIED = (MAGNITUDE, DIRECTION, FAR, UNCLEAR, NOT_JUDGED)
OUTCOME_TEXT = {
    MAGNITUDE: "closer to M#M",
    DIRECTION: "closer to D#D",
    FAR: "far from both",
    NOT_SEPARATED: "can't tell: M#M and D#D are not separated",
    UNCLEAR: "can't tell",
}


def trios(cells: list[Cell]) -> list[tuple[Cell, str, str]]:
    """Each off-diagonal M#D with the names of its M#M and D#D."""
    return [
        (cell, cell_name(m, m, True), cell_name(d, d, True))
        for cell in cells
        for m, d in [(cell.magnitude, cell.direction)]
        if m != d
    ]


def not_judged(
    trio: list[Cell | None], names: list[str], have: Callable[[Cell], int]
) -> str | None:
    """Why M#D is not judged (None when it is): a diagonal not in the grid, or the first of
    the three cells with a failed or missing seed (have(cell): its seeds with the data), or
    with fewer than two seeds."""
    for cell, name in zip(trio, names):
        if cell is None:
            return f"{name} is not in the grid"
    for cell in trio:
        total = len(cell.run_dirs) + len(cell.failures)
        if total - have(cell):
            return f"{cell.name} has {total - have(cell)} of {total} seeds failed/missing"
        if total < 2:
            return f"{cell.name} has {total} seed; the rule needs 2 or more"
    return None


def outcome(judgement: Judgement) -> str:
    """The verdict's words, with the interval that decided it where Δ's did not."""
    text = OUTCOME_TEXT[judgement.verdict]
    if judgement.verdict == NOT_SEPARATED:
        return f"{text} (s = {judgement.separation})"
    if judgement.verdict == FAR:
        return f"{text} (min(a, b) − g/2 = {judgement.far})"
    return text


# For M#D, M#M, D#D: their arrays for `judge` and the line's words before Δ (from the
# judgement's distances), or why they are not judged.
Found = tuple[list[Any], Callable[[Judgement], str]] | str


def verdicts(
    cells: list[Cell],
    label: str,
    have: Callable[[Cell], int],
    data: Callable[[Cell, Cell, Cell], Found],
    resamples: int,
) -> list[str]:
    """A line per off-diagonal cell, judged by graft/grid/verdict.py, then the tally."""
    by_name = {cell.name: cell for cell in cells}
    lines, outcomes = [], []
    for cell, own_m, own_d in trios(cells):
        trio = [cell, by_name.get(own_m), by_name.get(own_d)]
        reason = not_judged(trio, [cell.name, own_m, own_d], have)
        found = data(*trio) if reason is None else reason
        if isinstance(found, str):
            lines.append(f"- {cell.name}: not judged: {found}")
            outcomes.append(NOT_JUDGED)
            continue
        arrays, shown = found
        judgement = judge(*arrays, resamples=resamples)
        lines.append(
            f"- {cell.name}: {shown(judgement)}; Δ = {judgement.delta}: {outcome(judgement)}"
        )
        outcomes.append(UNCLEAR if judgement.verdict == NOT_SEPARATED else judgement.verdict)
    if not lines:
        return ["- (no off-diagonal cells)"]
    counts = ", ".join(f"{kind} {outcomes.count(kind)} of {len(outcomes)}" for kind in TALLIED)
    return [*lines, f"\nOn {label}: {counts}."]


def final_verdicts(cells: list[Cell], metric: str, resamples: int = RESAMPLES) -> list[str]:
    """The verdict on each off-diagonal cell's final `metric` (mean over seeds), then a tally."""

    def have(cell: Cell) -> int:
        return len(cell.values.get(metric) or [])

    def data(md: Cell, mm: Cell, dd: Cell) -> Found:
        arrays = [np.array(c.values[metric], dtype=float)[:, None] for c in (md, mm, dd)]
        for cell, values in zip((md, mm, dd), arrays):
            if not np.isfinite(values).all():
                return f"{cell.name} has a non-finite {metric}"
        return (
            arrays,
            lambda j: (
                f"{md.mean(metric):.4f} (to {mm.name} {j.to_magnitude:.4f}, "
                f"to {dd.name} {j.to_direction:.4f})"
            ),
        )

    return verdicts(cells, metric, have, data, resamples)


def logged_curves(runs: Runs, metric: str) -> list[tuple[list[int], list[float]]]:
    """(steps, values) of `metric` from each finished run's metrics.jsonl that logged it; a
    value that is not a number reads as nan (and keeps its cell from being judged)."""
    return [
        (steps.tolist(), values.tolist()) for steps, values in metric_curves(runs.run_dirs, metric)
    ]


def curve_verdicts(cells: list[Cell], metric: str, resamples: int = RESAMPLES) -> list[str]:
    """The verdict on each off-diagonal cell's whole `metric` curve, on the steps all seeds of
    it and its diagonals logged (a log scale for losses: graft/grid/verdict.py), then a tally."""
    logged = {cell.name: logged_curves(cell, metric) for cell in cells}
    if not any(logged.values()) and any(cell.run_dirs for cell in cells):
        return [
            f"- not judged: no finished run logged {metric!r} in its {METRICS} (the curve is "
            "the experiment's verdict.curve, default train/loss)"
        ]

    def have(cell: Cell) -> int:
        return len(logged[cell.name])

    def data(md: Cell, mm: Cell, dd: Cell) -> Found:
        steps, arrays = on_shared_steps([logged[c.name] for c in (md, mm, dd)])
        if not steps:
            return f"no step that every seed of {md.name}, {mm.name} and {dd.name} logged"
        arrays = [scale(metric, values) for values in arrays]
        for cell, values in zip((md, mm, dd), arrays):
            if not np.isfinite(values).all():
                bad = " (or <= 0, which has no log)" if log_scale(metric) else ""
                return f"{cell.name} logged a non-finite {metric}{bad}"
        return (
            arrays,
            lambda j: (
                f"curve distance to {mm.name} {j.to_magnitude:.4f}, to {dd.name} "
                f"{j.to_direction:.4f} (over {len(steps)} steps)"
            ),
        )

    return verdicts(cells, f"the {metric} curve", have, data, resamples)


def diagonal_lines(cells: list[Cell], metric: str) -> list[str]:
    """Whether each pair of diagonal cells differs by more than 2 standard errors of the
    difference (a proxy where they do not cannot tell M#D's side); nothing without a pair."""
    diagonals = [cell for cell in cells if cell.magnitude == cell.direction]
    lines, separated = [], 0
    for x, y in itertools.combinations(diagonals, 2):
        few = [c for c in (x, y) if len(c.values.get(metric) or []) < 2]
        if few:
            count = len(few[0].values.get(metric) or [])
            lines.append(
                f"- {x.name} − {y.name}: not checked ({few[0].name} has {count} finished "
                "seeds; the check needs 2 or more)"
            )
            continue
        found = difference(x.values[metric], y.values[metric])
        separated += found.separated
        side = "separated" if found.separated else "not separated"
        lines.append(
            f"- {x.name} − {y.name}: {found.difference:+.4f} (SE {found.standard_error:.4f}): "
            f"{side}"
        )
    if not lines:
        return []
    return [
        f"Diagonals on {metric} (difference of means, SE = √(se₁² + se₂²); separated when "
        f"|difference| > 2·SE): {separated} of {len(lines)} pairs separated",
        *lines,
    ]


def learning_rates_line(
    experiment: Experiment,
    tuned: bool,
    tuning: str | None = None,
    runs: Sequence[Path] = (),
) -> str:
    """The lines under a table's title: where its learning rates come from (with `tuning`, the
    tuning.md text: at which budget they were tuned, each chosen lr and whether it was
    bracketed), then a warning when `runs` did not all come from one clean commit."""
    if tuned:
        line = (
            "**Tuned**: each optimizer's learning rate was chosen by `graft-grid --tune` "
            "(see tuning.md); the other settings are the experiment file's."
        )
        budget = record_budget(tuning) if tuning else None
        choices = record_choices(tuning) if tuning else []
        if budget:
            line += f" Tuning budget: {budget}"
        if choices:
            line += " Chosen: " + "; ".join(choices) + "."
    else:
        source = experiment.source.name if experiment.source else "the experiment file"
        record = experiment.tuned_from
        line = (
            f"**Untuned**: the learning rates are the experiment file's ({source}), not chosen "
            "by `graft-grid --tune`."
            if not record
            else f"**Tuned elsewhere**: each `lr: tuned` in {source} is the one {record}/tuning.md "
            "chose; the other settings are the experiment file's."
        )
    clean, shas = commits(read_summary(run_dir).get("git_sha") for run_dir in runs)
    if runs and not clean:
        line += (
            f"\n\n**Provenance warning**: these runs are not all from one clean commit (git "
            f"{', '.join(shas)}); provenance.json lists each run's."
        )
    return line + "\n"


VERDICTS_LEAD = "Verdicts (Δ = b − a with its 95 % bootstrap interval; > 0: closer to M#M):"


def markdown(
    experiment: Experiment, cells: list[Cell], tuned: bool = False, tuning: str | None = None
) -> str:
    by_name = {cell.name: cell for cell in cells}
    runs = [run_dir for cell in cells for run_dir in cell.run_dirs]
    curve = experiment.verdict.get("curve", CURVE)
    resamples = experiment.verdict.get("resamples", RESAMPLES)
    parts = [
        f"# {experiment.name}\n",
        learning_rates_line(experiment, tuned, tuning, runs),
        experiment.description.strip() + "\n",
    ]
    parts.append(
        "The diagonal M#M is plain M. The paper's claim: the magnitude decides, so M#D lands "
        "closer to M#M than to D#D. Under each table, each off-diagonal M#D is judged against "
        "its diagonals, on the final metric and on the whole "
        f"{curve} curve{' (on a log scale)' if log_scale(curve) else ''}: "
        "a = its distance to M#M, b = to D#D, Δ = b − a (> 0: closer to M#M), with a 95 % "
        f"interval in brackets from a bootstrap over seeds ({resamples} resamples). "
        "The verdict: can't tell when M#M and D#D are not separated (the interval of "
        "s = M#M − D#D holds 0); far from both when min(a, b) − g/2 > 0 (g: the diagonals' "
        "distance); closer to M#M or to D#D when Δ's interval excludes 0; else can't tell. "
        "A cell is judged only when it and both diagonals have every seed finished, 2 or more "
        "each (graft/grid/verdict.py).\n"
    )
    for metric in experiment.metrics:
        parts.append(
            f"\n## {metric} (mean ± s.e.m. over the finished seeds of {experiment.seeds}, "
            f"n = {len(experiment.seeds)} where none failed; rows M, columns D)\n"
        )
        parts.append("| M \\ D | " + " | ".join(experiment.directions) + " |")
        parts.append("|---|" + "---|" * len(experiment.directions))
        for m in experiment.magnitudes:
            row = []
            for d in experiment.directions:
                name = cell_name(m, d, True)
                reference = experiment.reference.get(name, {}).get(metric)
                row.append(by_name[name].text(metric, reference, sem=True))
            parts.append(f"| **{m}** | " + " | ".join(row) + " |")
        parts.append("")
        diagonals = diagonal_lines(cells, metric)
        if diagonals:
            parts.extend([*diagonals, ""])
        parts.extend([VERDICTS_LEAD, *final_verdicts(cells, metric, resamples)])
    parts.append(
        f"\n## The {curve} curve (each seed's, compared on the steps all seeds of the three "
        "cells logged)\n"
    )
    parts.extend([VERDICTS_LEAD, *curve_verdicts(cells, curve, resamples)])
    parts.extend(failure_lines({cell.name: cell for cell in cells}))
    return "\n".join(parts) + "\n"


def write_csv(path: Path, experiment: Experiment, cells: list[Cell]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["magnitude", "direction", "metric", "mean", "std", "seeds", "reference"])
        for cell in cells:
            for metric in experiment.metrics:
                values = cell.values.get(metric) or []
                writer.writerow(
                    [
                        cell.magnitude,
                        cell.direction,
                        metric,
                        statistics.fmean(values) if values else "",
                        statistics.stdev(values) if len(values) > 1 else "",
                        len(values),
                        experiment.reference.get(cell.name, {}).get(metric, ""),
                    ]
                )


def latex(experiment: Experiment, cells: list[Cell]) -> str:
    metric = experiment.metrics[0]
    by_name = {cell.name: cell for cell in cells}
    lines = [
        "% " + f"{experiment.name}: {metric}, mean ± std over seeds; rows M, columns D",
        "\\begin{tabular}{l" + "c" * len(experiment.directions) + "}",
        "M \\textbackslash{} D & " + " & ".join(experiment.directions) + " \\\\",
        "\\hline",
    ]
    for m in experiment.magnitudes:
        row = []
        for d in experiment.directions:
            values = by_name[cell_name(m, d, True)].values.get(metric) or []
            spread = f" $\\pm$ {statistics.stdev(values):.4f}" if len(values) > 1 else ""
            row.append(f"{statistics.fmean(values):.4f}{spread}" if values else "--")
        lines.append(f"{m} & " + " & ".join(row) + " \\\\")
    lines.append("\\end{tabular}")
    return "\n".join(lines) + "\n"


@dataclass
class Written:
    """A results folder as written: how many runs finished, of how many, and which failed."""

    folder: Path
    finished: int
    total: int
    failures: list[str]  # "M#D seed k: reason (where)"


def write_results(
    experiment: Experiment,
    sweep_dir: Path,
    results_root: Path = RESULTS,
    *,
    tuned: bool = False,
    force: bool = False,
    tuning: str | None = None,
) -> Written:
    """Gather the runs under sweep_dir and write results/<experiment>/ (or -tuned/) in one
    piece (graft/grid/publish.py). UserError when none of the runs exists, or when the folder
    holds more finished runs than these (or the other kind) and not `force`. `tuning`: the
    tuning.md text (else the one graft-grid --tune left beside the tuned runs, else the old
    folder's)."""
    cells = gather(experiment, sweep_dir)
    command = f"graft-table {experiment.name}" + (" --tuned" if tuned else "")
    if not any(cell.started for cell in cells):
        raise UserError(no_runs(experiment, sweep_dir, tuned))
    results = results_folder(results_root, experiment.name, tuned)
    runs = [run_dir for cell in cells for run_dir in cell.run_dirs]
    total = len(cells) * len(experiment.seeds)
    refuse_to_shrink(results, len(runs), total, tuned=tuned, force=force, redo=command)
    if tuned and tuning is None and (sweep_dir.parent / "tuning" / "tuning.md").is_file():
        tuning = (sweep_dir.parent / "tuning" / "tuning.md").read_text()

    def build(folder: Path) -> None:
        (folder / "table.md").write_text(markdown(experiment, cells, tuned, tuning))
        write_csv(folder / "table.csv", experiment, cells)
        (folder / "table.tex").write_text(latex(experiment, cells))
        write_plots(folder, experiment, cells)
        write_provenance(folder, experiment, runs, tuned)
        if tuning is not None:
            (folder / "tuning.md").write_text(tuning)

    replace_folder(results, build, keep=["tuning.md"] if tuned else [])
    log_table(experiment, cells, results, sweep_dir)
    failures = [f"{cell.name} {failure}" for cell in cells for failure in cell.failures]
    return Written(results, len(runs), total, failures)


def no_runs(experiment: Experiment, sweep_dir: Path, tuned: bool) -> str:
    """Why there is no table to write, and what would make one."""
    other = sweep_dir.parent if tuned else sweep_dir / "tuned"
    hint = f"run graft-grid {experiment.name}{' --tune' if tuned else ''} first"
    if not tuned and other.is_dir():
        hint = f"{other} holds tuned runs: graft-table {experiment.name} --tuned"
    elif tuned and any(other.glob(f"*/{SEED_PREFIX}*")):
        hint = f"{other} holds untuned runs: graft-table {experiment.name}"
    return f"no runs of {experiment.name} in {sweep_dir}/ (none of its run folders exist); {hint}"


def write_provenance(
    results: Path, experiment: Experiment, runs: list[Path], tuned: bool = False
) -> None:
    """results/provenance.json: the experiment; whether every run came from one clean commit
    (`clean`, `git_shas`); each run's commit, torch, threads and wall time; the code, versions
    and hardware that wrote the folder; and every finished run's config (how
    graft/grid/publish.py counts what a results folder holds)."""
    summaries = [read_summary(run_dir) for run_dir in runs]
    clean, shas = commits(s.get("git_sha") for s in summaries)
    provenance = {
        "experiment": experiment.document,
        "tuned": tuned,
        "clean": clean,  # every run from one commit without local changes (outside results/)
        "git_shas": shas,
        "run_provenance": {
            str(run_dir): {
                "git_sha": s.get("git_sha"),
                "torch": (s.get("versions") or {}).get("torch"),
                "threads": (s.get("hardware") or {}).get("cpu_threads"),
                "wall_seconds": s.get("wall_seconds"),
            }
            for run_dir, s in zip(runs, summaries)
        },
        "written_by": {"git_sha": git_sha(), "versions": versions()},
        "hardware": summaries[0]["hardware"] if summaries else None,
        "wall_seconds": round(sum(s["wall_seconds"] for s in summaries), 1),
        # What each run's optimizers were (the experiment's optimizers table applied).
        "optimizers": {str(run_dir): s.get("optimizers") for run_dir, s in zip(runs, summaries)},
        "runs": {str(run_dir): read_config(run_dir) for run_dir in runs},
    }
    (results / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))


def main() -> None:
    parser = Parser(prog="graft-table", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("experiment", help="a name in experiments/ or a path to its YAML")
    parser.add_argument(
        "--tuned",
        action="store_true",
        help="the runs graft-grid --tune made (outputs/EXP/tuned/ -> results/EXP-tuned/); "
        "default: the untuned runs (outputs/EXP/ -> results/EXP/)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a results folder that holds more finished runs (or the other kind)",
    )
    args = parser.parse_args()
    try:
        experiment = load_experiment(args.experiment)
        if experiment.study:
            raise UserError(
                f"{experiment.name} is a {experiment.study['kind']} study, not a grid: its table "
                f"comes from graft-grid {experiment.name} (finished runs are skipped)"
            )
        sweep_dir = publish.OUTPUTS / experiment.name
        if args.tuned:
            sweep_dir = sweep_dir / "tuned"
        written = write_results(
            experiment, sweep_dir, publish.RESULTS, tuned=args.tuned, force=args.force
        )
    except UserError as error:
        exit_with("graft-table", error)
    print((written.folder / "table.md").read_text())


if __name__ == "__main__":
    main()
