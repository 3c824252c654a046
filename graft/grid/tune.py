"""Tuning the diagonal: each base optimizer's learning rate, before a grid uses it.

A grid is only meaningful if every optimizer on its diagonal is well tuned, since M#D takes M's
learning rate. An experiment's `tune` block names, per optimizer, the learning rates to try
(two or more), the seeds, and optionally overrides for the tuning runs and how often a choice
at an end of its list may be extended:

    tune:
      lr: {sgd: [0.03, 0.1, 0.3], adam: [3.0e-4, 1.0e-3, 3.0e-3]}
      seeds: [0]          # default: the grid's first seed
      metric: eval/loss   # default: the experiment's first metric
      extend: 2           # default 2; 0: never extend
      overrides: []       # default none: the tuning runs have the grid's own budget

`graft-grid --tune` runs plain M for every value (one Hydra multirun per optimizer, in
`outputs/<experiment>/tuning/<optimizer>/lr<value>/seed<k>/`) and picks the best mean over the
seeds by `tune.metric` (lowest for a loss, highest otherwise; a value with any failed seed
counts as failed, and of equal means the one tried first wins). A choice at either end of the
values tried is not bracketed: graft-grid tries one more value beyond that end (that end's
value times the ratio of the two values there, rounded to 4 significant digits) and picks
again, up to `extend` times. A value beyond the end that fails counts as worse, so it
brackets. The runs of every value, extensions too, stay in the tuning folder: a rerun skips
them and reaches the same choice.

It writes `results/<experiment>-tuned/tuning.md` (graft/grid/tuning_record.py: other
experiments read their tuned learning rates from it), which says at which budget tuning ran
and whether each choice was bracketed, and runs the grid with the chosen learning rates.
`tune.overrides` gives the sweep other settings than the grid's (a shorter budget for a
full-scale experiment, say); the record and the grid's table.md say so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.common.errors import UserError
from graft.common.run_dir import SUMMARY, read_summary, seed_folder
from graft.grid.experiment import Experiment
from graft.grid.launch import multirun
from graft.grid.tuning_record import (
    BRACKETED,
    CHOSEN_SECTION,
    LISTED,
    budget_line,
    chosen_line,
    table_header,
    table_row,
)

Results = dict[float, list[float | None]]  # value -> the metric of each seed (None: failed)
DEFAULT_EXTEND = 2
DIGITS = 4  # significant digits of an extended value: no 0.30000000000000004 folders


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


def extensions_allowed(block: dict[str, Any]) -> int:
    extend = block.get("extend")
    return DEFAULT_EXTEND if extend is None else extend


@dataclass
class Trial:
    """One learning rate tried: the metric of each seed (None: that seed failed)."""

    value: float
    results: list[float | None]
    tried: str = LISTED  # or "extension k (above|below)"

    @property
    def failed(self) -> int:
        return sum(result is None for result in self.results)

    @property
    def mean(self) -> float | None:
        """The mean over the seeds; None when any of them failed."""
        if self.failed:
            return None
        return statistics.fmean(result for result in self.results if result is not None)


@dataclass
class Choice:
    """One optimizer's tuning: every value tried (in the order tried), the chosen one, and
    whether it is bracketed (an evaluated value on both sides of it)."""

    name: str
    trials: list[Trial] = field(default_factory=list)
    chosen: float = math.nan
    outcome: str = ""  # BRACKETED, or why not

    @property
    def bracketed(self) -> bool:
        return self.outcome == BRACKETED


def beyond(values: list[float], side: str) -> tuple[float | None, str]:
    """The value one geometric step beyond the `side` ("upper" or "lower") end of the sorted
    `values`, to DIGITS significant digits; (None, why) when there is none."""
    first, second = (values[-1], values[-2]) if side == "upper" else (values[0], values[1])
    step = first / second
    value = float(f"{first * step:.{DIGITS}g}")
    if not math.isfinite(value) or value <= 0:
        return None, f"the next value {first} x {step:.4g} is not a finite number > 0"
    if value in values:
        return None, (
            f"{first} x {step:.4g} rounds to {value} at {DIGITS} significant digits, a value "
            "already tried"
        )
    return value, ""


def choose(
    name: str,
    values: list[float],
    extend: int,
    lower: bool,
    run: Callable[[list[float]], Results],
) -> Choice:
    """Pick `name`'s best learning rate from `values`, extending past an end choice up to
    `extend` times; `run(values)` runs those values (skipping finished runs) and returns each
    one's per-seed results. UserError when every value failed."""
    choice = Choice(name)
    # As floats, whose str is the folder name, the Hydra override and the record's value alike.
    listed = sorted(float(value) for value in values)
    results = run(listed)
    choice.trials = [Trial(value, results[value]) for value in listed]
    extensions = 0
    while True:
        finite = [trial for trial in choice.trials if trial.mean is not None]
        if not finite:
            tried = ", ".join(str(trial.value) for trial in choice.trials)
            raise UserError(f"tuning {name}: every learning rate in [{tried}] failed")
        pick = min if lower else max
        best = pick(finite, key=lambda trial: trial.mean)  # the first tried of equal means
        choice.chosen = best.value
        tried = sorted(trial.value for trial in choice.trials)
        side = "lower" if best.value == tried[0] else "upper" if best.value == tried[-1] else ""
        if not side:
            choice.outcome = BRACKETED
            return choice
        at_end = f"at the {side} end of [{', '.join(map(str, tried))}]"
        if extensions == extend:
            choice.outcome = (
                f"not bracketed: {at_end} after {extensions} extension"
                f"{'' if extensions == 1 else 's'} (tune.extend: {extend})"
            )
            return choice
        value, why = beyond(tried, side)
        if value is None:
            choice.outcome = f"not bracketed: {at_end}; extension not possible: {why}"
            return choice
        extensions += 1
        label = f"extension {extensions} ({'above' if side == 'upper' else 'below'})"
        print(f"graft-grid: tuning {name}: {best.value} is {at_end}; trying {value}", flush=True)
        choice.trials.append(Trial(value, run([value])[value], label))


def run_tuning(
    experiment: Experiment, shared: list[str], sweep_dir: Path
) -> tuple[dict[str, float], str]:
    """Run the tuning sweeps (finished runs are skipped); the chosen lr per optimizer and the
    tuning.md text."""
    block = tune_block(experiment)
    seeds = block.get("seeds") or experiment.seeds[:1]
    metric = block.get("metric") or experiment.metrics[0]
    extend = extensions_allowed(block)
    overrides = block.get("overrides") or []
    choices = []
    for name, values in sorted(block["lr"].items()):
        folder = sweep_dir / "tuning" / name
        print(f"graft-grid: tuning {name}: lr in {values}", flush=True)

        # The table's lr for this optimizer gives way to the swept one: Hydra refuses a second
        # `+key=` for a single value (an extension), where a sweep of several replaced it.
        table_lr = f"+optimizers.{name}.lr="
        others = [line for line in shared if not line.startswith(table_lr)]

        def run(
            values: list[float], name: str = name, folder: Path = folder, others: list = others
        ) -> Results:
            missing = [v for v in values if not all(finished(folder, v, s) for s in seeds)]
            if missing:  # a finished value needs no graft-train process to say so
                multirun(
                    [
                        f"optim@magnitude={name}",
                        "graft=off",
                        *others,
                        *overrides,
                        f"+optimizers.{name}.lr={','.join(map(str, missing))}",
                        f"trainer.seed={','.join(map(str, seeds))}",
                    ],
                    folder,
                    f"lr${{optimizers.{name}.lr}}/" + seed_folder("${trainer.seed}"),
                )
            return {value: results_of(folder, value, seeds, metric) for value in values}

        choices.append(choose(name, values, extend, lower_is_better(metric), run))
    return {c.name: c.chosen for c in choices}, record(experiment, choices, block, metric)


def record(
    experiment: Experiment, choices: list[Choice], block: dict[str, Any], metric: str
) -> str:
    """tuning.md's text (its parts: graft/grid/tuning_record.py)."""
    seeds = block.get("seeds") or experiment.seeds[:1]
    extend = extensions_allowed(block)
    lines = [
        f"# {experiment.name}: learning-rate tuning on the diagonal\n",
        f"Plain M per optimizer, seeds {seeds}; chosen by {metric} "
        f"({'lowest' if lower_is_better(metric) else 'highest'} mean over the seeds; a value "
        "with a failed seed counts as failed).\n",
        budget_line(block.get("overrides") or []) + "\n",
        f"Bracketing: a choice at either end of the values tried gets one more value beyond "
        f"that end (the ratio of the two values there, {DIGITS} significant digits), up to "
        f"tune.extend = {extend} times; a value beyond the end that fails counts as worse.\n",
        *table_header(metric),
    ]
    for choice in choices:
        for trial in sorted(choice.trials, key=lambda trial: trial.value):
            lines.append(
                table_row(
                    choice.name,
                    trial.value,
                    trial.mean,
                    trial.value == choice.chosen,
                    failed=(trial.failed, len(trial.results)),
                    tried=trial.tried,
                )
            )
    lines += ["", CHOSEN_SECTION, ""]
    lines += [chosen_line(choice.name, choice.chosen, choice.outcome) for choice in choices]
    return "\n".join(lines) + "\n"


def finished(folder: Path, value: float, seed: int) -> bool:
    """Whether the run of `value` and `seed` has ended (its summary.json, any status)."""
    return (folder / f"lr{value}" / seed_folder(seed) / SUMMARY).is_file()


def results_of(folder: Path, value: float, seeds: list[int], metric: str) -> list[float | None]:
    """The metric of each seed's run of one value; None for a seed that did not finish or
    has no finite metric."""
    results: list[float | None] = []
    for seed in seeds:
        run_dir = folder / f"lr{value}" / seed_folder(seed)
        try:
            summary = read_summary(run_dir)
        except (OSError, ValueError):
            results.append(None)
            continue
        result = summary.get(metric) if summary.get("status") == "finished" else None
        finite = isinstance(result, int | float) and math.isfinite(result)
        results.append(float(result) if finite else None)
    return results
