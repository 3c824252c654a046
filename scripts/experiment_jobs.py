"""The jobs every experiment in experiments/ expands to, as JSON: to show that a change to the
experiment files (or to how graft-grid reads them) leaves every run as it was.

For each experiment (and, where it has a tune block, once more with --tune) graft-grid's
run_grid is called with Hydra's multirun replaced by a recorder: nothing trains. Each recorded
multirun is kept as given (its override list and job folder), and expanded into its jobs,
each composed as graft-train would compose it (graft/train/cli.py compose_run), with the
optimizer specs the run would build (magnitude and direction, the `optimizers` table applied).

A fake summary.json per job (status finished, every metric 1.0) lets a tuning sweep pick its
values and go on to the grid. Not covered: the last arm of a static study (D + static), which
needs the grafted arm's real norms; it shares every override but its own with the arms before.
Learning rates an experiment leaves null are filled with 0.123 (graft-grid refuses to start
without them); imagenet_resnet50 gets a tiny ImageFolder for its task.data.root.

    python scripts/experiment_jobs.py OUT.json [NAME ...]
    diff <(python scripts/experiment_jobs.py /dev/stdout) <(...)   # two checkouts, same jobs?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import graft.grid.run as grid_run
import graft.grid.studies as studies
import graft.grid.tune as grid_tune
from graft.common.errors import UserError
from graft.grid.experiment import available, load_experiment
from graft.train.cli import compose_run
from graft.train.config import register_resolvers
from graft.train.optimizer import optimizer_specs

PLACEHOLDER_LR = 0.123


def expand(overrides: list[str]) -> list[list[str]]:
    """A multirun's override list -> one override list per job, as Hydra's basic sweeper makes
    them (its own function: a later line of the same key replaces an earlier one)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return jobs


def recorder(root: Path, calls: list[dict[str, Any]]):
    def multirun(overrides: list[str], sweep_dir: Path, subdir: str) -> int:
        jobs = {}
        for job in expand(overrides):
            config, _ = compose_run(job)
            folder = OmegaConf.to_container(
                OmegaConf.create({**config, "__subdir": subdir}), resolve=True
            )["__subdir"]
            magnitude, direction = optimizer_specs(config)
            jobs[folder] = {"config": config, "magnitude": magnitude, "direction": direction}
            summary = {"status": "finished", **{m: 1.0 for m in METRICS}}
            path = sweep_dir / folder / "summary.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary))
        calls.append(
            {
                "sweep_dir": str(sweep_dir.relative_to(root)),
                "overrides": overrides,
                "subdir": subdir,
                "jobs": dict(sorted(jobs.items())),
            }
        )
        return 0

    return multirun


METRICS: list[str] = []


def dump(name: str, tune: bool) -> dict[str, Any]:
    experiment = load_experiment(name)
    filled = {
        optimizer: {k: PLACEHOLDER_LR if v is None else v for k, v in settings.items()}
        for optimizer, settings in experiment.optimizers.items()
    }
    experiment = dataclasses.replace(experiment, optimizers=filled)
    METRICS[:] = [*experiment.metrics, experiment.tune.get("metric") or experiment.metrics[0]]
    calls: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        extra = []
        if experiment.task == "imagenet_resnet50":
            for split in ("train", "val"):
                (root / "imagenet" / split / "n0").mkdir(parents=True)
            extra = [f"task.data.root={root / 'imagenet'}"]
        fake = recorder(root, calls)
        saved = grid_run.multirun, grid_tune.multirun, studies.multirun
        grid_run.multirun = grid_tune.multirun = studies.multirun = fake
        ended = "finished"
        try:
            grid_run.run_grid(experiment, extra, root / "outputs", root / "results", tune=tune)
        except (UserError, Exception) as error:  # the fake runs hold no curves or norms
            ended = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        finally:
            grid_run.multirun, grid_tune.multirun, studies.multirun = saved
        text = json.dumps({"calls": calls, "ended": ended}, default=str)
        return json.loads(text.replace(str(root), "<tmp>"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("names", nargs="*", help="default: every experiment")
    args = parser.parse_args()
    register_resolvers()
    result = {}
    for name in args.names or available():
        experiment = load_experiment(name)
        for tune in (False, True) if experiment.tune else (False,):
            key = f"{name}{' --tune' if tune else ''}"
            print(f"{key} ...", file=sys.stderr, flush=True)
            result[key] = dump(name, tune)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
