"""`graft-grid [EXPERIMENT] [overrides]`: every M#D cell x seed of an experiment, then its table.

The cells run as one Hydra multirun of graft-train (the basic launcher by default, or
`hydra/launcher=slurm`), each in `outputs/<experiment>/<M>#<D>/seed<k>/`. The trainer skips
finished runs and resumes unfinished ones, so rerunning a grid picks up where it stopped; a cell
that fails is recorded and the others still run.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from omegaconf import OmegaConf

from graft.grid.experiment import Experiment, load_experiment
from graft.grid.launch import multirun
from graft.grid.table import RESULTS, write_results
from graft.grid.tune import run_tuning, tune_block
from graft.train.cli import check_overrides
from graft.train.config import flatten
from graft.train.errors import UserError, exit_with
from graft.transfer.studies import run_study

DEFAULT_EXPERIMENT = "digits_resnet"
OUTPUTS = Path("outputs")


def main() -> None:
    args = sys.argv[1:]
    tune = "--tune" in args
    args = [arg for arg in args if arg != "--tune"]
    named = [arg for arg in args if "=" not in arg and not arg.startswith("-")]
    overrides = [arg for arg in args if arg not in named]
    try:
        if len(named) > 1:
            raise UserError(f"one experiment at a time, got {', '.join(named)}")
        experiment = load_experiment(named[0] if named else DEFAULT_EXPERIMENT)
        run_grid(experiment, overrides, tune=tune)
    except UserError as error:
        exit_with("graft-grid", error)


def run_grid(
    experiment: Experiment,
    extra: list[str],
    outputs: Path = OUTPUTS,
    results_root: Path = RESULTS,
    *,
    tune: bool = False,
) -> Path:
    """Run (or resume) every cell x seed of `experiment`; write and print its table. An
    experiment with a study block runs that study instead (graft/transfer/studies.py).

    With `tune`, first sweep the diagonal's learning rates (graft/grid/tune.py) and run the
    grid with the best of each.
    """
    if tune:
        tune_block(experiment)  # a missing or wrong tune block fails before anything runs
    for name, settings in experiment.optimizers.items():
        for key, value in settings.items():
            if value is None and not (tune and key == "lr" and name in experiment.tune["lr"]):
                raise UserError(
                    f"{experiment.source}: optimizers.{name}.{key} is null (not known); set it "
                    "in the experiment file, or give a tune.lr list and pass --tune"
                )
    shared = experiment.shared_overrides(extra)
    magnitude, direction = experiment.cells()[0]
    # One representative cell composes first: a bad override fails here, not in every job.
    check_overrides(
        [f"optim@magnitude={magnitude}", f"optim@direction={direction}", *shared],
        sweep=True,  # the optimizers table serves every cell
    )
    sweep_dir = outputs / experiment.name
    refuse_another_version(experiment, extra, sweep_dir)
    tuning = None
    if tune:
        chosen, tuning = run_tuning(experiment, experiment.shared_overrides(extra), sweep_dir)
        settings = {name: dict(values) for name, values in experiment.optimizers.items()}
        for name, lr in chosen.items():
            settings.setdefault(name, {})["lr"] = lr
        experiment = dataclasses.replace(experiment, optimizers=settings)
        shared = experiment.shared_overrides(extra)
        sweep_dir = sweep_dir / "tuned"
    if experiment.study:
        results = run_study(experiment, shared, sweep_dir, results_root)
        if tuning is not None:
            (results / "tuning.md").write_text(tuning)
        print((results / "table.md").read_text(), flush=True)
        return results
    cells = len(experiment.cells()) * len(experiment.seeds)
    print(f"graft-grid: {experiment.name}: {cells} runs in {sweep_dir}/", flush=True)
    code = multirun(
        [
            f"optim@magnitude={','.join(experiment.magnitudes)}",
            f"optim@direction={','.join(experiment.directions)}",
            f"trainer.seed={','.join(map(str, experiment.seeds))}",
            *shared,
            f"++logger.group={experiment.name}",
        ],
        sweep_dir,
        "${cell:${magnitude.name},${direction.name},true}/seed${trainer.seed}",
    )
    if code:
        print(f"graft-grid: some runs failed (exit {code}); see the table")
    results = write_results(experiment, sweep_dir, results_root)
    if tuning is not None:
        (results / "tuning.md").write_text(tuning)
        print(tuning, flush=True)
    print((results / "table.md").read_text(), flush=True)
    return results


def refuse_another_version(experiment: Experiment, extra: list[str], sweep_dir: Path) -> None:
    """Keep one experiment version (file and command-line overrides) per output folder."""
    recorded = sweep_dir / "experiment.yaml"
    current = {**OmegaConf.to_container(OmegaConf.load(experiment.source)), "command_line": extra}
    if recorded.exists():
        before = flatten(OmegaConf.to_container(OmegaConf.load(recorded)))
        after = flatten(current)
        changed = sorted(
            key
            for key in before.keys() | after.keys()
            if before.get(key) != after.get(key)
            and not key.startswith(("description", "reference"))  # wording, not the runs
        )
        if changed:
            raise UserError(
                f"{sweep_dir} holds runs of another version of {experiment.name} (changed: "
                f"{', '.join(changed[:4])}); move that folder away to start fresh"
            )
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(current), recorded)


if __name__ == "__main__":
    main()
