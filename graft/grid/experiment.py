"""Experiment files: an M#D grid, its seeds and settings, and the paper's numbers beside it.

An experiment (`experiments/<name>.yaml`) holds:

    name, description
    task:        a configs/task/ option
    grid:        {magnitude: [optimizers], direction: [optimizers]}
    seeds:       [0, 1, 2]
    optimizers:  {name: {hyperparameter: value}}: each optimizer's own settings, used wherever
                 it is M or D (M#D takes M's learning rate; the diagonal is plain M)
    overrides:   Hydra overrides for every cell (trainer.max_steps=..., schedule=...)
    metrics:     summary keys that fill the table (eval/top1, ...); the first is the headline
    reference:   {"M#D": {metric: value}}: the paper's numbers where known
    tune:        optional learning-rate sweeps of the diagonal (graft-grid --tune; tune.py)
    study:       optional: instead of the grid's table, a study of its one M#D pair
                 (graft/transfer/studies.py): {kind: static, window, reduce},
                 {kind: tuning_transfer, lrs: [D's learning rates]} or {kind: schedule_trend}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from graft.train.config import cell_name, group_options
from graft.train.errors import UserError
from graft.transfer.static import REDUCTIONS

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
KEYS = (
    "name",
    "description",
    "task",
    "grid",
    "seeds",
    "optimizers",
    "overrides",
    "metrics",
    "reference",
    "tune",
    "study",
)

# Study kinds and the options each takes (graft/transfer/studies.py).
STUDY_OPTIONS = {
    "static": ("window", "reduce"),
    "tuning_transfer": ("lrs",),
    "schedule_trend": (),
}


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    task: str
    magnitudes: list[str]
    directions: list[str]
    seeds: list[int]
    metrics: list[str]
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    tune: dict[str, Any] = field(default_factory=dict)  # see graft/grid/tune.py
    study: dict[str, Any] = field(default_factory=dict)  # see graft/transfer/studies.py
    source: Path | None = None

    def cells(self) -> list[tuple[str, str]]:
        """(M, D) for every cell, rows M, columns D."""
        return [(m, d) for m in self.magnitudes for d in self.directions]

    def cell_names(self) -> list[str]:
        return [cell_name(m, d, True) for m, d in self.cells()]

    def shared_overrides(self, extra: list[str]) -> list[str]:
        """The overrides every run shares (a grid adds M, D and the seed); extra: the command
        line's."""
        return [f"task={self.task}", *self.optimizer_overrides(), *self.overrides, *extra]

    def optimizer_overrides(self) -> list[str]:
        """`+optimizers.<name>.<key>=<value>` for the trainer, one per setting."""
        return [
            f"+optimizers.{name}.{key}={format_value(value)}"
            for name, settings in sorted(self.optimizers.items())
            for key, value in sorted(settings.items())
        ]


def format_value(value: Any) -> str:
    """A Hydra override value: lists as [a,b], everything else as YAML writes it."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(item) for item in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def available() -> list[str]:
    return sorted(path.stem for path in EXPERIMENTS.glob("*.yaml"))


def load_experiment(name_or_path: str) -> Experiment:
    """The experiment by name (experiments/<name>.yaml) or by path, checked.

    Raises UserError (one line) for an unknown experiment, a missing or unknown key, an
    optimizer or task that does not exist, or values of the wrong shape.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = EXPERIMENTS / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(
            f"unknown experiment {name_or_path!r}; available: {', '.join(available())} "
            "(or a path to an experiment YAML)"
        )
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: an experiment is a mapping of {', '.join(KEYS)}")
    unknown = sorted(set(raw) - set(KEYS))
    missing = [key for key in ("name", "task", "grid", "seeds", "metrics") if key not in raw]
    if unknown or missing:
        problem = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
        raise UserError(f"{path}: {problem}; keys: {', '.join(KEYS)}")
    grid = raw["grid"] or {}
    experiment = Experiment(
        name=str(raw["name"]),
        description=str(raw.get("description", "")),
        task=str(raw["task"]),
        magnitudes=list(grid.get("magnitude") or []),
        directions=list(grid.get("direction") or []),
        seeds=list(raw["seeds"] or []),
        metrics=list(raw["metrics"] or []),
        optimizers=dict(raw.get("optimizers") or {}),
        overrides=list(raw.get("overrides") or []),
        reference=dict(raw.get("reference") or {}),
        tune=dict(raw.get("tune") or {}),
        study=dict(raw.get("study") or {}),
        source=path,
    )
    check(experiment, path)
    return experiment


def check(experiment: Experiment, path: Path) -> None:
    optimizers, tasks = group_options("optim@magnitude"), group_options("task")
    if experiment.task not in tasks:
        raise UserError(f"{path}: unknown task {experiment.task!r}; allowed: {', '.join(tasks)}")
    if not experiment.magnitudes or not experiment.directions:
        raise UserError(f"{path}: grid needs non-empty magnitude: [...] and direction: [...]")
    for name in [*experiment.magnitudes, *experiment.directions, *experiment.optimizers]:
        if name not in optimizers:
            raise UserError(
                f"{path}: unknown optimizer {name!r}; allowed: {', '.join(optimizers)} "
                "(configs/optim/)"
            )
    if not experiment.seeds or not all(isinstance(s, int) and s >= 0 for s in experiment.seeds):
        raise UserError(f"{path}: seeds must be a non-empty list of integers >= 0")
    if not experiment.metrics:
        raise UserError(f"{path}: metrics needs at least one summary key, e.g. eval/top1")
    if experiment.study:
        check_study(experiment, path)
    cells = set(experiment.cell_names())
    for cell in experiment.reference:
        if cell not in cells:
            raise UserError(f"{path}: reference cell {cell!r} is not in the grid")


def check_study(experiment: Experiment, path: Path) -> None:
    kind = experiment.study.get("kind")
    if kind not in STUDY_OPTIONS:
        raise UserError(
            f"{path}: study.kind {kind!r} is unknown; allowed: {', '.join(STUDY_OPTIONS)}"
        )
    unknown = sorted(set(experiment.study) - {"kind", *STUDY_OPTIONS[kind]})
    if unknown:
        allowed = ", ".join(STUDY_OPTIONS[kind]) or "none"
        raise UserError(
            f"{path}: study option {unknown[0]!r} does not apply to {kind}; allowed: {allowed}"
        )
    if len(experiment.magnitudes) != 1 or len(experiment.directions) != 1:
        raise UserError(
            f"{path}: a {kind} study is of one pair: grid needs one magnitude and one direction"
        )
    window = experiment.study.get("window")
    if window is not None and not (isinstance(window, str) and re.fullmatch(r"\d*:\d*", window)):
        raise UserError(
            f"{path}: study.window {window!r} is not 'START:END' in steps; quote it "
            "(YAML reads 10:20 unquoted as a number), or null for the default"
        )
    if experiment.study.get("reduce", "median") not in REDUCTIONS:
        raise UserError(
            f"{path}: study.reduce {experiment.study['reduce']!r} is unknown; allowed: "
            f"{', '.join(REDUCTIONS)}"
        )
    if kind == "tuning_transfer" and not experiment.study.get("lrs"):
        raise UserError(
            f"{path}: a tuning_transfer study needs lrs: [the direction's learning rates to sweep]"
        )
