"""The aggregated grid to Weights & Biases: one run per experiment in the experiment's group,
holding the table (one row per M#D cell) and the heatmap, curves and schedule plots.

It goes wherever the cells' own runs went: W&B on (logger=wandb, the default) means the table
is logged too, online or offline by the same rule; logger=none means nothing is sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from graft.common.run_dir import read_config
from graft.grid.experiment import Experiment
from graft.train.metrics import start_wandb, wandb_mode

if TYPE_CHECKING:
    from graft.grid.table import Cell

PLOTS = ("heatmap", "curves", "schedule")


def table_rows(experiment: Experiment, cells: list[Cell]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): magnitude, direction, cell, then mean, std and the paper's value per
    metric, then how many seeds finished and what failed."""
    columns = ["magnitude", "direction", "cell"]
    for metric in experiment.metrics:
        columns += [f"{metric} mean", f"{metric} std", f"{metric} paper"]
    columns += ["seeds finished", "failures"]
    rows = []
    for cell in cells:
        row: list[Any] = [cell.magnitude, cell.direction, cell.name]
        for metric in experiment.metrics:
            finished = bool(cell.values.get(metric))
            row += [
                cell.mean(metric),
                cell.spread(metric) if finished else None,
                experiment.reference.get(cell.name, {}).get(metric),
            ]
        row += [len(cell.run_dirs), "; ".join(map(str, cell.failures))]
        rows.append(row)
    return columns, rows


def log_table(experiment: Experiment, cells: list[Cell], results: Path, sweep_dir: Path) -> None:
    """Log the aggregated table when the cells logged to W&B; nothing otherwise."""
    runs = [run_dir for cell in cells for run_dir in cell.run_dirs]
    if not runs:
        return
    logger = read_config(runs[0])["logger"]
    mode = wandb_mode(logger)
    if mode is None:
        return
    import wandb

    columns, rows = table_rows(experiment, cells)
    run = start_wandb(
        sweep_dir,
        *mode,
        logger,
        {"experiment": experiment.document},
        f"{experiment.name} table",
        None,
        group=experiment.name,
        job_type="table",
    )
    images = {
        name: wandb.Image(str(results / f"{name}.png"))
        for name in PLOTS
        if (results / f"{name}.png").exists()
    }
    run.log({"results": wandb.Table(columns=columns, data=rows), **images})
    run.finish()
