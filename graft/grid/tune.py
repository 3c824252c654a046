"""Tuning the diagonal: each base optimizer's learning rate, before a grid uses it.

A grid is only meaningful if every optimizer on its diagonal is well tuned, since M#D takes M's
learning rate. An experiment's `tune` block names, per optimizer, the learning rates to try,
the seeds, and overrides for the tuning runs (a shorter budget, say):

    tune:
      lr: {sgd: [0.03, 0.1, 0.3], adam: [3.0e-4, 1.0e-3, 3.0e-3]}
      seeds: [0]
      metric: eval/loss
      overrides: [trainer.max_steps=100]

`graft-grid --tune` runs plain M for every value (one Hydra multirun per optimizer, in
`outputs/<experiment>/tuning/<optimizer>/lr<value>/seed<k>/`), picks the best by `tune.metric`
(default: the experiment's first metric; lowest for a loss, highest otherwise), writes
`results/<experiment>-tuned/tuning.md` (graft/grid/tuning_record.py: other experiments read
their tuned learning rates from it), and runs the grid with the chosen learning rates.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from graft.common.errors import UserError
from graft.common.run_dir import SUMMARY, read_summary, seed_folder
from graft.grid.experiment import Experiment
from graft.grid.launch import multirun
from graft.grid.tuning_record import table_header, table_row


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "perplexity" in metric


def tune_block(experiment: Experiment) -> dict[str, Any]:
    block = experiment.tune
    if not block or not block.get("lr"):
        raise UserError(
            f"{experiment.source}: --tune needs a tune block with lr: {{optimizer: [values]}}"
        )
    unknown = sorted(set(block["lr"]) - set(experiment.magnitudes + experiment.directions))
    if unknown:
        raise UserError(f"{experiment.source}: tune.lr names {unknown[0]!r}, not in the grid")
    return block


def run_tuning(
    experiment: Experiment, shared: list[str], sweep_dir: Path
) -> tuple[dict[str, float], str]:
    """Run the tuning sweeps (finished runs are skipped); the chosen lr per optimizer and the
    tuning.md text."""
    block = tune_block(experiment)
    seeds = block.get("seeds") or experiment.seeds[:1]
    metric = block.get("metric") or experiment.metrics[0]
    chosen: dict[str, float] = {}
    lines = [
        f"# {experiment.name}: learning-rate tuning on the diagonal\n",
        f"Plain M per optimizer, seeds {seeds}, extra overrides {block.get('overrides') or []}; "
        f"chosen by {metric} ({'lowest' if lower_is_better(metric) else 'highest'} mean).\n",
        *table_header(metric),
    ]
    for name, values in sorted(block["lr"].items()):
        folder = sweep_dir / "tuning" / name
        print(f"graft-grid: tuning {name}: lr in {values}", flush=True)
        multirun(
            [
                f"optim@magnitude={name}",
                "graft=off",
                *shared,
                *(block.get("overrides") or []),
                f"+optimizers.{name}.lr={','.join(map(str, values))}",
                f"trainer.seed={','.join(map(str, seeds))}",
            ],
            folder,
            f"lr${{optimizers.{name}.lr}}/" + seed_folder("${trainer.seed}"),
        )
        scores = {value: score(folder, value, seeds, metric) for value in values}
        finite = {value: s for value, s in scores.items() if s is not None}
        if not finite:
            raise UserError(f"tuning {name}: every learning rate in {values} failed")
        pick = min if lower_is_better(metric) else max
        chosen[name] = pick(finite, key=finite.__getitem__)
        lines += [table_row(name, v, s, v == chosen[name]) for v, s in scores.items()]
    return chosen, "\n".join(lines) + "\n"


def score(folder: Path, value: float, seeds: list[int], metric: str) -> float | None:
    """The metric's mean over the seeds of one tuning value; None if any seed failed."""
    results = []
    for seed in seeds:
        run_dir = folder / f"lr{value}" / seed_folder(seed)
        if not (run_dir / SUMMARY).exists():
            return None
        summary = read_summary(run_dir)
        if summary["status"] != "finished" or metric not in summary:
            return None
        results.append(summary[metric])
    return statistics.fmean(results)
