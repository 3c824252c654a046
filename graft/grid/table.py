"""`graft-table EXPERIMENT`: an experiment's runs gathered into results/<experiment>/.

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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from graft.grid.experiment import Experiment, load_experiment
from graft.grid.wandb_table import log_table
from graft.train.config import cell_name
from graft.train.errors import UserError, exit_with
from graft.train.metrics import read_metrics
from graft.train.provenance import git_sha, versions
from graft.transfer.recorded import implicit_schedules

RESULTS = Path(__file__).resolve().parents[2] / "results"


@dataclass
class Runs:
    """The seeds of one setting (a grid cell, a study's arm): finished metrics, failures."""

    values: dict[str, list[float]]  # metric -> one value per finished seed
    failures: list[str]  # "seed k: why"
    run_dirs: list[Path]  # the finished runs

    def mean(self, metric: str) -> float | None:
        values = self.values.get(metric) or []
        return statistics.fmean(values) if values else None

    def spread(self, metric: str) -> float:
        """The standard deviation over seeds (0 with fewer than two)."""
        values = self.values.get(metric) or []
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def text(self, metric: str, reference: float | None = None) -> str:
        values = self.values.get(metric) or []
        if not values:
            return "failed: " + "; ".join(self.failures) if self.failures else "not run"
        spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        shown = f"{statistics.fmean(values):.4f}{spread}"
        if reference is not None:
            shown += f" (paper {reference})"
        if self.failures:
            shown += f" ({len(self.failures)} failed)"
        return shown


def gather_runs(folder: Path, seeds: list[int], metrics: list[str]) -> Runs:
    """The runs folder/seed<k>/ for every seed."""
    runs = Runs({metric: [] for metric in metrics}, [], [])
    for seed in seeds:
        run_dir = folder / f"seed{seed}"
        summary_path = run_dir / "summary.json"
        if not summary_path.exists():
            runs.failures.append(f"seed {seed}: no summary.json (see {run_dir}/train.log)")
            continue
        summary = json.loads(summary_path.read_text())
        if summary["status"] != "finished":
            runs.failures.append(f"seed {seed}: {summary.get('error', summary['status'])}")
            continue
        runs.run_dirs.append(run_dir)
        for metric in metrics:
            if metric in summary:
                runs.values[metric].append(summary[metric])
    return runs


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
        cells.append(Cell(runs.values, runs.failures, runs.run_dirs, magnitude, direction))
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


def markdown(experiment: Experiment, cells: list[Cell]) -> str:
    by_name = {cell.name: cell for cell in cells}
    parts = [f"# {experiment.name}\n", experiment.description.strip() + "\n"]
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
        lines = [
            line
            for line in read_metrics(cell.run_dirs[0] / "metrics.jsonl")
            if "train/loss" in line
        ]
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
        lines = [line for line in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in line]
        curves.append(([line["step"] for line in lines], [line["train/loss"] for line in lines]))
    if not curves:
        return None
    length = min(len(steps) for steps, _ in curves)
    return curves[0][0][:length], np.mean([values[:length] for _, values in curves], axis=0)


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[index : index + size] for index in range(0, len(items), size)]


def write_results(experiment: Experiment, sweep_dir: Path, results_root: Path = RESULTS) -> Path:
    """Gather the runs under sweep_dir and write results/<experiment>/; its path."""
    cells = gather(experiment, sweep_dir)
    results = results_root / experiment.name
    results.mkdir(parents=True, exist_ok=True)
    (results / "table.md").write_text(markdown(experiment, cells))
    write_csv(results / "table.csv", experiment, cells)
    (results / "table.tex").write_text(latex(experiment, cells))
    plots(results, experiment, cells)
    schedule_plot(results, experiment, cells)
    runs = [run_dir for cell in cells for run_dir in cell.run_dirs]
    write_provenance(results, experiment, runs)
    log_table(experiment, cells, results, sweep_dir)
    return results


def write_provenance(results: Path, experiment: Experiment, runs: list[Path]) -> None:
    """results/provenance.json: the experiment, code, versions, hardware, and every run."""
    summaries = [json.loads((run_dir / "summary.json").read_text()) for run_dir in runs]
    provenance = {
        "experiment": OmegaConf.to_container(OmegaConf.load(experiment.source)),
        "git_sha": git_sha(),
        "versions": versions(),
        "hardware": summaries[0]["hardware"] if summaries else None,
        "wall_seconds": round(sum(s["wall_seconds"] for s in summaries), 1),
        # What each run's optimizers were (the experiment's optimizers table applied).
        "optimizers": {str(run_dir): s.get("optimizers") for run_dir, s in zip(runs, summaries)},
        "runs": {
            str(run_dir): OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra/config.yaml"))
            for run_dir in runs
        },
    }
    (results / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))


def main() -> None:
    args = sys.argv[1:]
    try:
        if len(args) != 1:
            raise UserError("usage: graft-table EXPERIMENT (a name in experiments/ or a path)")
        experiment = load_experiment(args[0])
        sweep_dir = Path("outputs") / experiment.name
        if (sweep_dir / "tuned").is_dir():  # graft-grid --tune ran the grid there
            sweep_dir = sweep_dir / "tuned"
        results = write_results(experiment, sweep_dir)
    except UserError as error:
        exit_with("graft-table", error)
    print((results / "table.md").read_text())


if __name__ == "__main__":
    main()
