"""`graft-table EXPERIMENT [--tuned] [--force]`: an experiment's runs gathered into results.

The untuned runs (outputs/<experiment>/) go to results/<experiment>/, with --tuned the runs
graft-grid --tune made (outputs/<experiment>/tuned/) to results/<experiment>-tuned/; the
folder is replaced in one piece, and never by fewer finished runs without --force
(graft/grid/publish.py).

Written there: table.md (rows M, columns D, mean ± std over seeds, the paper's number beside ours
where known, and for every off-diagonal cell whether M#D lands closer to M#M or to D#D),
table.csv, table.tex, heatmap.png (the headline metric), curves.png (training loss per cell),
schedule.png (per-layer ‖u_M‖/‖u_D‖ over steps: the implicit step-size schedule) and
provenance.json (git SHA, versions, hardware, wall time, every run's resolved config and the
optimizer settings it ran with). When the cells logged to W&B, the table and plots go there too
(graft/grid/wandb_table.py).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from graft.grid.publish import RESULTS, refuse_to_shrink, replace_folder, results_folder
from graft.grid.tuning_record import record_budget, record_choices
from graft.grid.wandb_table import log_table
from graft.train.metrics import read_metrics
from graft.train.recorded import implicit_schedules


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

    def spread(self, metric: str) -> float:
        """The standard deviation over seeds (0 with fewer than two)."""
        values = self.values.get(metric) or []
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def text(self, metric: str, reference: float | None = None) -> str:
        """The mean ± std; the failed seeds named briefly (their reasons: failure_lines)."""
        values = self.values.get(metric) or []
        seeds = ", ".join(str(failure.seed) for failure in self.failures)
        if not values:
            return f"failed (seed {seeds})" if self.failures else "not run"
        spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
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


def closer_to(cells: list[Cell], metric: str) -> list[str]:
    """For each off-diagonal M#D: is its `metric` nearer M#M's or D#D's? Then a tally.

    A difference smaller than the largest seed spread of the three cells is called a tie:
    with few seeds, closer by less than the noise is not closer.
    """
    by_name = {cell.name: cell for cell in cells}
    lines = []
    tally = {"M#M": 0, "D#D": 0, "tie": 0}
    for cell in cells:
        m, d = cell.magnitude, cell.direction
        trio = [cell, by_name.get(f"{m}#{m}"), by_name.get(f"{d}#{d}")]
        if m == d or any(c is None or c.mean(metric) is None for c in trio):
            continue
        mine, own_m, own_d = (c.mean(metric) for c in trio)
        to_m, to_d = abs(mine - own_m), abs(mine - own_d)
        noise = max(c.spread(metric) for c in trio)
        side = "tie" if abs(to_m - to_d) <= noise else "M#M" if to_m < to_d else "D#D"
        tally[side] += 1
        verdict = {
            "tie": f"neither: the gap is within the seed spread ({noise:.4f})",
            "M#M": "closer to M#M (the magnitude's)",
            "D#D": "closer to D#D (the direction's)",
        }[side]
        lines.append(
            f"- {cell.name}: {mine:.4f}, {verdict}; |Δ| to {m}#{m} {to_m:.4f}, "
            f"to {d}#{d} {to_d:.4f}"
        )
    if not lines:
        return ["- (needs the diagonal cells)"]
    return [
        *lines,
        f"\nOn {metric}: {tally['M#M']} of {len(lines)} closer to the magnitude's M#M, "
        f"{tally['D#D']} to the direction's D#D, {tally['tie']} within the seed spread.",
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
        line = (
            f"**Untuned**: the learning rates are the experiment file's ({source}), not chosen "
            "by `graft-grid --tune`."
        )
    clean, shas = commits(read_summary(run_dir).get("git_sha") for run_dir in runs)
    if runs and not clean:
        line += (
            f"\n\n**Provenance warning**: these runs are not all from one clean commit (git "
            f"{', '.join(shas)}); provenance.json lists each run's."
        )
    return line + "\n"


def markdown(
    experiment: Experiment, cells: list[Cell], tuned: bool = False, tuning: str | None = None
) -> str:
    by_name = {cell.name: cell for cell in cells}
    runs = [run_dir for cell in cells for run_dir in cell.run_dirs]
    parts = [
        f"# {experiment.name}\n",
        learning_rates_line(experiment, tuned, tuning, runs),
        experiment.description.strip() + "\n",
    ]
    parts.append(
        "The diagonal M#M is plain M. Under each table: does M#D land closer to the "
        "magnitude's own result (M#M) or to the direction's (D#D)? The paper's claim: the "
        "magnitude decides.\n"
    )
    for metric in experiment.metrics:
        parts.append(
            f"\n## {metric} (mean ± std over seeds {experiment.seeds}; rows M, columns D)\n"
        )
        parts.append("| M \\ D | " + " | ".join(experiment.directions) + " |")
        parts.append("|---|" + "---|" * len(experiment.directions))
        for m in experiment.magnitudes:
            row = []
            for d in experiment.directions:
                name = cell_name(m, d, True)
                reference = experiment.reference.get(name, {}).get(metric)
                row.append(by_name[name].text(metric, reference))
            parts.append(f"| **{m}** | " + " | ".join(row) + " |")
        parts.append("")
        parts.extend(closer_to(cells, metric))
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


def plots(results: Path, experiment: Experiment, cells: list[Cell]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric = experiment.metrics[0]
    grid = np.array(
        [
            [np.nan if (v := cell.mean(metric)) is None else v for cell in row]
            for row in chunks(cells, len(experiment.directions))
        ]
    )
    figure, axes = plt.subplots(
        figsize=(1.6 * len(experiment.directions) + 2, 1.2 * len(grid) + 1.5)
    )
    image = axes.imshow(grid, cmap="viridis")
    axes.set_xticks(range(len(experiment.directions)), experiment.directions)
    axes.set_yticks(range(len(experiment.magnitudes)), experiment.magnitudes)
    axes.set_xlabel("direction D")
    axes.set_ylabel("magnitude M")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            axes.text(j, i, f"{value:.3f}", ha="center", va="center", color="w")
    figure.colorbar(image, label=metric)
    axes.set_title(f"{experiment.name}: {metric}")
    figure.tight_layout()
    figure.savefig(results / "heatmap.png", dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(8, 5))
    for cell in cells:
        if not cell.run_dirs:
            continue
        lines = [line for line in read_metrics(cell.run_dirs[0] / METRICS) if "train/loss" in line]
        axes.plot(
            [line["step"] for line in lines],
            [line["train/loss"] for line in lines],
            label=cell.name,
            linestyle="-" if cell.magnitude == cell.direction else "--",
        )
    axes.set_xlabel("step")
    axes.set_ylabel("train/loss")
    axes.set_yscale("log")
    axes.set_title(f"{experiment.name}: training loss (seed {experiment.seeds[0]})")
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(results / "curves.png", dpi=120)
    plt.close(figure)


def schedule_plot(results: Path, experiment: Experiment, cells: list[Cell]) -> None:
    """Per-layer ‖u_M‖/‖u_D‖ over steps for every off-diagonal cell: the implicit schedule
    M imposes on D (the median over tensors in black, a few single tensors in colour)."""
    import matplotlib.pyplot as plt
    import numpy as np

    grafted = [cell for cell in cells if cell.magnitude != cell.direction and cell.run_dirs]
    grafted = [(cell, *implicit_schedules(cell.run_dirs[0])) for cell in grafted]
    grafted = [(cell, steps, ratios) for cell, steps, ratios in grafted if steps]
    if not grafted:
        return
    columns = min(3, len(grafted))
    rows = -(-len(grafted) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    for axis, (cell, steps, ratios) in zip(axes.flat, grafted):
        names = list(ratios)
        for name in (names[0], names[len(names) // 2], names[-1]):
            axis.plot(steps, ratios[name], linewidth=1, label=name)
        axis.plot(steps, np.nanmedian(np.array(list(ratios.values())), axis=0), "k", label="median")
        axis.set_yscale("log")
        axis.set_title(cell.name, fontsize="medium")
        axis.set_xlabel("step")
        axis.set_ylabel("‖u_M‖ / ‖u_D‖")
        axis.legend(fontsize="x-small")
    for axis in list(axes.flat)[len(grafted) :]:
        axis.axis("off")
    figure.suptitle(f"{experiment.name}: implicit step-size schedule (seed {experiment.seeds[0]})")
    figure.tight_layout()
    figure.savefig(results / "schedule.png", dpi=120)
    plt.close(figure)


def mean_loss_curve(run_dirs: list[Path]) -> tuple[list[int], Any] | None:
    """(steps, train/loss averaged over the runs), over the steps all of them logged."""
    import numpy as np

    curves = []
    for run_dir in run_dirs:
        lines = [line for line in read_metrics(run_dir / METRICS) if "train/loss" in line]
        curves.append(([line["step"] for line in lines], [line["train/loss"] for line in lines]))
    if not curves:
        return None
    length = min(len(steps) for steps, _ in curves)
    return curves[0][0][:length], np.mean([values[:length] for _, values in curves], axis=0)


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[index : index + size] for index in range(0, len(items), size)]


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
        plots(folder, experiment, cells)
        schedule_plot(folder, experiment, cells)
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
