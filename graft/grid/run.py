"""`graft-grid [EXPERIMENT] [OVERRIDE ...] [--tune] [--force]`: every M#D cell x seed of an
experiment, then its table.

The cells run as one Hydra multirun of graft-train (the basic launcher by default, or
`hydra/launcher=slurm`), each in `outputs/<experiment>/<M>#<D>/seed<k>/` (with --tune, in
`outputs/<experiment>/tuned/`). The trainer skips finished runs and resumes unfinished ones, so
rerunning a grid picks up where it stopped; a cell that fails is recorded and the others still
run, and graft-grid then exits with code 1 (2 for a mistake in the command or the experiment).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from omegaconf import OmegaConf

from graft.common.cli_parser import Parser
from graft.common.errors import EXIT_RUN_FAILED, UserError, exit_with
from graft.common.run_dir import seed_folder
from graft.grid import publish
from graft.grid.experiment import Bad, Experiment, load_experiment, override
from graft.grid.launch import multirun
from graft.grid.publish import check_writable, refuse_to_shrink, results_folder, write_files
from graft.grid.studies import run_study
from graft.grid.table import Written, write_results
from graft.grid.tune import run_tuning, tune_block
from graft.grid.tuning_record import TUNED
from graft.train.checkpoints import write_atomically
from graft.train.cli import check_overrides
from graft.train.config import flatten
from graft.train.optimizer import refuse_two_sources
from graft.train.strict import override_key

DEFAULT_EXPERIMENT = "digits_resnet"


def main() -> None:
    parser = Parser(
        prog="graft-grid",
        description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="e.g. graft-grid digits_resnet trainer.max_steps=5 --tune",
    )
    parser.add_argument(
        "arguments",
        nargs="*",
        metavar="[EXPERIMENT] [OVERRIDE]",
        help=f"a name in experiments/ or a path to its YAML (default {DEFAULT_EXPERIMENT}), "
        "then Hydra overrides for every run (key=value)",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="first tune each diagonal optimizer's lr (the experiment's tune block; a choice at "
        "an end of its list is extended past it, tune.extend times at most); results go to "
        "results/EXP-tuned/, with tuning.md",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a results folder that holds more finished runs (or the other kind)",
    )
    args = parser.parse_intermixed_args()
    named = [arg for arg in args.arguments if "=" not in arg]
    overrides = [arg for arg in args.arguments if "=" in arg]
    try:
        if len(named) > 1:
            raise UserError(
                f"one experiment at a time, got {', '.join(named)} (overrides are key=value)"
            )
        experiment = load_experiment(named[0] if named else DEFAULT_EXPERIMENT)
        written = run_grid(experiment, overrides, tune=args.tune, force=args.force)
    except UserError as error:
        exit_with("graft-grid", error)
    if written.failures:
        print(
            f"graft-grid: {len(written.failures)} of {written.total} runs did not finish; why: "
            f"'Failed runs' in {written.folder / 'table.md'}",
            file=sys.stderr,
        )
        sys.exit(EXIT_RUN_FAILED)


def run_grid(
    experiment: Experiment,
    extra: list[str],
    outputs: Path | None = None,
    results_root: Path | None = None,
    *,
    tune: bool = False,
    force: bool = False,
) -> Written:
    """Run (or resume) every cell x seed of `experiment`; write and print its table. An
    experiment with a study block runs that study instead (graft/grid/studies.py).

    With `tune`, first sweep the diagonal's learning rates (graft/grid/tune.py: bracketed,
    at the grid's budget unless tune.overrides says otherwise) and run the grid with the best
    of each; its results go to results/<experiment>-tuned/. Everything that
    can be checked (the experiment, the overrides, that the output and results folders can be
    written) is checked before the first run starts.
    """
    outputs = publish.OUTPUTS if outputs is None else outputs
    results_root = publish.RESULTS if results_root is None else results_root
    if tune:
        tune_block(experiment)  # a missing or wrong tune block fails before anything runs
    for name, settings in experiment.optimizers.items():
        for key, value in settings.items():
            if value is None and not (tune and key == "lr" and name in experiment.tune["lr"]):
                raise UserError(
                    f"{experiment.source}: optimizers.{name}.{key} is null (not known); set it "
                    "in the experiment file, or give a tune.lr list and pass --tune"
                )
    for item in extra:
        try:
            override(item, "command line")
        except Bad:
            raise UserError(
                f"{item!r} on the command line is not a Hydra override key=value (e.g. "
                "trainer.max_steps=100; quote values with brackets or commas)"
            ) from None
    shared = experiment.shared_overrides(extra)
    refuse_two_sources(
        [*experiment.overrides, *extra],
        table_of(experiment, tune),
        roles_of(experiment, tune),
        str(experiment.source),
    )
    magnitude, direction = experiment.cells()[0]
    # One representative cell composes first: a bad override fails here, not in every job.
    check_overrides(
        [f"optim@magnitude={magnitude}", f"optim@direction={direction}", *shared],
        sweep=True,  # the optimizers table serves every cell
    )
    sweep_dir = outputs / experiment.name
    check_writable(sweep_dir, "run folder")
    results = results_folder(results_root, experiment.name, tune)
    check_writable(results, "results folder")
    if not experiment.study:  # refused even if every run finishes: say so before running them
        total = len(experiment.cells()) * len(experiment.seeds)
        redo = f"graft-grid {experiment.name}{' --tune' if tune else ''}"
        refuse_to_shrink(results, total, total, tuned=tune, force=force, redo=redo)
    refuse_another_version(experiment, extra, sweep_dir)
    tuning = None
    if tune:
        chosen, tuning = run_tuning(experiment, experiment.shared_overrides(extra), sweep_dir)
        settings = {name: dict(values) for name, values in experiment.optimizers.items()}
        for name, lr in chosen.items():
            settings.setdefault(name, {})["lr"] = lr
        experiment = dataclasses.replace(experiment, optimizers=settings)
        shared = experiment.shared_overrides(extra)
        # Beside the tuning runs too: graft-table --tuned puts it in the results again.
        write_files(sweep_dir / "tuning", {"tuning.md": lambda path: path.write_text(tuning)})
        sweep_dir = sweep_dir / "tuned"
    publishing = {"tuned": tune, "force": force, "tuning": tuning}
    if experiment.study:
        written = run_study(experiment, shared, sweep_dir, results_root, **publishing)
        print((written.folder / "table.md").read_text(), flush=True)
        return written
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
        "${cell:${magnitude.name},${direction.name},true}/" + seed_folder("${trainer.seed}"),
    )
    if code:
        print(f"graft-grid: some runs failed (exit {code}); see the table", flush=True)
    written = write_results(experiment, sweep_dir, results_root, **publishing)
    if tuning is not None:
        print(tuning, flush=True)
    print((written.folder / "table.md").read_text(), flush=True)
    return written


def table_of(experiment: Experiment, tune: bool) -> dict[str, dict]:
    """The `optimizers` table the runs get: the file's, and with --tune an lr for each
    optimizer the tuning sets."""
    table = {name: dict(settings) for name, settings in experiment.optimizers.items()}
    for name in experiment.tune.get("lr", {}) if tune else ():
        table.setdefault(name, {})["lr"] = TUNED
    return table


def roles_of(experiment: Experiment, tune: bool) -> dict[str, list[str]]:
    """Which optimizers run as M, which as D: a grid's rows and columns; a study's and a
    tuning sweep's plain runs (graft=off) put each of its optimizers in M's place too."""
    magnitudes = list(experiment.magnitudes)
    if experiment.study:
        magnitudes += experiment.directions
    if tune:
        magnitudes += list(experiment.tune.get("lr", {}))
    return {"magnitude": list(dict.fromkeys(magnitudes)), "direction": experiment.directions}


def refuse_another_version(experiment: Experiment, extra: list[str], sweep_dir: Path) -> None:
    """Keep one experiment version (the file as it runs, and the command-line overrides) per
    output folder."""
    recorded = sweep_dir / "experiment.yaml"
    current = {**experiment.document, "command_line": extra}
    if recorded.exists():
        before = comparable(OmegaConf.to_container(OmegaConf.load(recorded)))
        after = comparable(current)
        changed = sorted(
            key
            for key in before.keys() | after.keys()
            if before.get(key) != after.get(key)
            # wording and how the table judges the runs, not the runs
            and not key.startswith(("description", "reference", "verdict"))
        )
        if changed:
            raise UserError(
                f"{sweep_dir} holds runs of another version of {experiment.name} (changed: "
                f"{', '.join(changed[:4])}); move that folder away to start fresh"
            )
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(recorded, lambda path: OmegaConf.save(OmegaConf.create(current), path))


def comparable(document: dict) -> dict:
    """An experiment as flat keys, its override lists sorted where no two lines touch the same
    key: Hydra composes such lines alike in any order, and a file that extends a base lists
    them in the base's order, not necessarily in the order the file it replaced had."""
    flat = flatten(document)
    for key in ("overrides", "tune.overrides"):
        lines = flat.get(key)
        if isinstance(lines, list) and all(isinstance(line, str) for line in lines):
            keys = [override_key(line) for line in lines]
            pairs = [(a, b) for i, a in enumerate(keys) for j, b in enumerate(keys) if i != j]
            if not any(a == b or b.startswith(a + ".") for a, b in pairs):
                flat[key] = sorted(lines)
    return flat


if __name__ == "__main__":
    main()
