"""graft-grid and graft-table on a 2x2 grid of a few steps: runs, reruns, failures, tables."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from graft.common.errors import EXIT_RUN_FAILED, UserError
from graft.grid import publish
from graft.grid.compare import compare
from graft.grid.experiment import available, load_experiment
from graft.grid.run import comparable, run_grid
from graft.grid.run import main as run_main
from graft.grid.tuning_record import chosen_lrs, table_header, table_row

TINY_EXPERIMENT = """
name: tiny
description: A 2x2 grid of a few steps.
task: digits_resnet
grid:
  magnitude: [sgd, adam]
  direction: [sgd, adam]
seeds: [0, 1]
optimizers:
  sgd: {{lr: {sgd_lr}, momentum: 0.5}}
overrides: [trainer.max_steps=3, trainer.batch_size=8, logger=none, trainer.progress=false,
            trainer.log_every=1, trainer.log_norms_every=1]
metrics: [eval/top1, eval/loss]
reference:
  "adam#adam": {{eval/top1: 0.5}}
"""


def write_experiment(folder: Path, sgd_lr: float | None = 0.05) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(TINY_EXPERIMENT.format(sgd_lr="null" if sgd_lr is None else sgd_lr))
    return path


@pytest.fixture(scope="module")
def grid(module_tmp) -> tuple[Path, Path]:
    folder = module_tmp
    experiment = load_experiment(str(write_experiment(folder)))
    written = run_grid(experiment, [], outputs=folder / "outputs", results_root=folder / "results")
    assert (written.finished, written.total, written.failures) == (8, 8, [])
    return folder, written.folder


@pytest.mark.slow
def test_every_cell_and_seed_runs_in_its_stable_folder(grid):
    folder, _ = grid
    for cell in ("sgd#sgd", "sgd#adam", "adam#sgd", "adam#adam"):
        for seed in (0, 1):
            summary = json.loads(
                (folder / f"outputs/tiny/{cell}/seed{seed}/summary.json").read_text()
            )
            assert summary["status"] == "finished" and summary["cell"] == cell
    # The experiment's per-optimizer settings reach every cell where that optimizer is used.
    summary = json.loads((folder / "outputs/tiny/adam#sgd/seed0/summary.json").read_text())
    assert summary["optimizers"]["direction"]["momentum"] == 0.5
    assert summary["optimizers"]["magnitude"]["lr"] == 1e-3


@pytest.mark.slow
def test_the_table_has_every_cell_mean_and_spread_and_the_verdicts(grid):
    folder, results = grid
    table = (results / "table.md").read_text()
    assert "| M \\ D | sgd | adam |" in table and "(paper 0.5)" in table
    assert table.splitlines()[2].startswith("**Untuned**: the learning rates are the experiment")
    rows = [line for line in table.splitlines() if line.startswith("| **")]
    assert sum(row.count(" ± ") for row in rows) == 8  # 4 cells x 2 metrics, 2 seeds each
    assert "(mean ± s.e.m. over the finished seeds of [0, 1], n = 2" in table
    assert "- sgd#adam: " in table and "- adam#sgd: " in table
    # Two seeds per cell: every off-diagonal cell is judged, on each metric and the curve.
    tallies = [line for line in table.splitlines() if line.startswith("On ")]
    assert [line.split(": ")[0] for line in tallies] == [
        "On eval/top1",
        "On eval/loss",
        "On the train/loss curve",
    ]
    assert all(line.endswith(", not judged 0 of 2.") for line in tallies), tallies
    assert "- sgd#sgd − adam#adam: " in table  # the diagonals' 2·SE check
    rows = list(csv.DictReader((results / "table.csv").open()))
    assert len(rows) == 8 and {row["seeds"] for row in rows} == {"2"}
    top1 = json.loads((folder / "outputs/tiny/adam#sgd/seed1/summary.json").read_text())[
        "eval/top1"
    ]
    values = [
        float(r["mean"])
        for r in rows
        if r["magnitude"] == "adam" and r["direction"] == "sgd" and r["metric"] == "eval/top1"
    ]
    first = json.loads((folder / "outputs/tiny/adam#sgd/seed0/summary.json").read_text())[
        "eval/top1"
    ]
    assert values == [pytest.approx((top1 + first) / 2)]
    assert "\\begin{tabular}" in (results / "table.tex").read_text()
    for image in ("heatmap.png", "curves.png", "schedule.png"):
        assert (results / image).read_bytes()[:4] == b"\x89PNG"
    provenance = json.loads((results / "provenance.json").read_text())
    assert len(provenance["runs"]) == 8 and provenance["experiment"]["name"] == "tiny"
    assert provenance["tuned"] is False and results.name == "tiny"


@pytest.mark.slow
def test_graft_compare_writes_metrics_and_curves(grid):
    folder, _ = grid
    cells = [folder / "outputs/tiny/adam#sgd", folder / "outputs/tiny/sgd#sgd/seed0"]
    out = compare(cells, folder / "compare")
    table = (out / "compare.md").read_text()
    assert "| adam#sgd | 2 | " in table and "| sgd#sgd/seed0 | 1 | " in table
    assert "eval/top1" in table and " ± " in table
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="no summary.json and no seed"):
        compare([folder / "outputs"], folder / "compare")


@pytest.mark.slow
def test_a_rerun_skips_finished_cells(grid, capfd):
    folder, results = grid
    before = (results / "table.md").read_text()
    experiment = load_experiment(str(folder / "tiny.yaml"))
    run_grid(experiment, [], outputs=folder / "outputs", results_root=folder / "results")
    assert capfd.readouterr().out.count("nothing to do") == 8
    assert (results / "table.md").read_text() == before


@pytest.mark.slow
def test_another_version_of_the_experiment_is_refused(grid):
    folder, _ = grid
    changed = tmp = folder / "changed"
    tmp.mkdir(exist_ok=True)
    experiment = load_experiment(str(write_experiment(changed, sgd_lr=0.5)))
    with pytest.raises(
        UserError, match="holds runs of another version of tiny .*optimizers.sgd.lr"
    ):
        run_grid(experiment, [], outputs=folder / "outputs", results_root=folder / "results")


@pytest.mark.slow
def test_a_failing_cell_is_recorded_the_others_still_run_and_graft_grid_exits_1(
    tmp_path, monkeypatch, capsys
):
    write_experiment(tmp_path, sgd_lr=1e30)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(publish, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sys, "argv", ["graft-grid", "tiny.yaml", "graft=off"])
    with pytest.raises(SystemExit) as exit_info:
        run_main()
    assert exit_info.value.code == EXIT_RUN_FAILED
    table = (tmp_path / "results/tiny/table.md").read_text()
    # sgd as magnitude diverges: the cell says which seeds, the section below says why and where
    assert "| **sgd** | failed (seed 0, 1) | failed (seed 0, 1) |" in table
    failed = table.split("## Failed runs")[1]
    assert "- sgd#sgd seed 0: non-finite training loss at step" in failed
    assert f"({Path('outputs/tiny/sgd#sgd/seed0')}" in failed
    assert failed.count("\n- ") == 4
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1] == (
        "graft-grid: 4 of 8 runs did not finish; why: 'Failed runs' in "
        f"{tmp_path / 'results/tiny/table.md'}"
    )
    adam = json.loads((tmp_path / "outputs/tiny/adam#sgd/seed0/summary.json").read_text())
    assert adam["status"] == "finished"


@pytest.mark.slow
def test_tune_picks_each_diagonal_learning_rate_then_runs_the_grid_with_it(tmp_path):
    path = write_experiment(tmp_path)
    path.write_text(
        path.read_text().replace("seeds: [0, 1]", "seeds: [0]")
        + "tune:\n  lr: {sgd: [0.01, 0.05], adam: [0.001, 0.003]}\n"
        + "  overrides: [trainer.max_steps=2]\n"
        + "  extend: 0\n"  # no value beyond an end (tests/test_tuning.py extends)
    )
    results = run_grid(
        load_experiment(str(path)),
        [],
        outputs=tmp_path / "outputs",
        results_root=tmp_path / "results",
        tune=True,
    ).folder
    # Tuned results have their own folder, say so at the top, and keep the tuning table.
    assert results == tmp_path / "results/tiny-tuned"
    assert not (tmp_path / "results/tiny").exists()
    header = (results / "table.md").read_text().splitlines()[2]
    assert "**Tuned**: each optimizer's learning rate was chosen by `graft-grid --tune`" in header
    # At which budget (not the grid's: the tuning runs' overrides named), and each choice.
    assert "the tuning runs add tune.overrides [trainer.max_steps=2]" in header
    assert json.loads((results / "provenance.json").read_text())["tuned"] is True
    tuning = (results / "tuning.md").read_text()
    assert (tmp_path / "outputs/tiny/tuning/tuning.md").read_text() == tuning
    chosen = {
        row.split("|")[1].strip(): float(row.split("|")[2])
        for row in tuning.splitlines()
        if "**chosen**" in row
    }
    assert set(chosen) == {"sgd", "adam"} and chosen["adam"] in (0.001, 0.003)
    assert chosen_lrs(tuning) == chosen  # what an experiment's `lr: tuned` reads back
    for name in ("adam", "sgd"):  # two values: every choice is at an end, none extended
        assert f"{name}: {chosen[name]}, not bracketed: at the " in header
    for name in ("sgd", "adam"):
        for value in (0.01, 0.05) if name == "sgd" else (0.001, 0.003):
            summary = tmp_path / f"outputs/tiny/tuning/{name}/lr{value}/seed0/summary.json"
            assert json.loads(summary.read_text())["steps"] == 2
    cell = json.loads((tmp_path / "outputs/tiny/tuned/adam#sgd/seed0/summary.json").read_text())
    assert cell["optimizers"]["magnitude"]["lr"] == chosen["adam"]
    assert cell["steps"] == 3  # the grid's own budget, not the tuning runs'


@pytest.mark.slow
def test_with_wandb_on_the_cells_and_the_aggregated_table_go_to_wandb(tmp_path, monkeypatch):
    """W&B for real, offline: each cell is a W&B run, and one more run holds the table."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = write_experiment(tmp_path)
    path.write_text(
        path.read_text()
        .replace("seeds: [0, 1]", "seeds: [0]")
        .replace("magnitude: [sgd, adam]", "magnitude: [adam]")
        .replace("logger=none", "logger=wandb")
    )
    run_grid(load_experiment(str(path)), [], tmp_path / "outputs", tmp_path / "results")
    for cell in ("adam#sgd", "adam#adam"):
        assert list((tmp_path / f"outputs/tiny/{cell}/seed0/wandb").glob("offline-run-*"))
    (table_file,) = (tmp_path / "outputs/tiny/wandb").glob("offline-run-*/files/media/table/*")
    table = json.loads(table_file.read_text())
    assert table["columns"][:4] == ["magnitude", "direction", "cell", "eval/top1 mean"]
    rows = {row[2]: row for row in table["data"]}
    assert set(rows) == {"adam#sgd", "adam#adam"}
    assert rows["adam#adam"][5] == 0.5  # the paper's value from the experiment's reference
    summary = json.loads((tmp_path / "outputs/tiny/adam#sgd/seed0/summary.json").read_text())
    assert rows["adam#sgd"][3] == pytest.approx(summary["eval/top1"])
    media = (tmp_path / "outputs/tiny/wandb").glob("offline-run-*/files/media/images/*.png")
    assert {image.name.split("_")[0] for image in media} == {"heatmap", "curves", "schedule"}


def test_the_shipped_experiments_load():
    assert {
        "digits_resnet",
        "digits_resnet_5x5",
        "tiny_bert",
        "imagenet_resnet50",
        "bert_base",
        "bert_sgd_static",
        "digits_static",
        "digits_tuning_transfer",
        "adagrad_schedule",
    } <= set(available())
    for name in available():
        experiment = load_experiment(name)
        assert experiment.cells() and experiment.metrics


# What each shipped experiment gives every one of its runs (task, optimizer table, overrides),
# its cells and seeds: a change to a base, a tuning record or the loader that moves a run shows
# here. scripts/experiment_jobs.py composes every job, for a before/after diff of a change.
DIGITS = "task=digits_resnet"
DIGITS_BUDGET = "trainer.max_steps=150 trainer.batch_size=64 trainer.eval_every=50"
RESNET8 = "task=digits_resnet8"
RESNET8_LOGS = "trainer.log_every=5 trainer.log_norms_every=5 trainer.progress=false logger=none"
RESNET8_TUNED = (  # results/digits_resnet8-tuned/tuning.md's choices
    "+optimizers.adagrad.lr=0.01 +optimizers.adagrad.momentum=0.9 +optimizers.adam.lr=0.005 "
    "+optimizers.sgd.lr=0.03 +optimizers.sgd.momentum=0.9"
)
EIGHT, SIXTEEN = list(range(8)), list(range(16))
PYDOC_LM_LOGS = "trainer.log_every=10 trainer.log_norms_every=10 trainer.progress=false logger=none"
PYDOC_LM_STATIC_TUNED = (  # results/pydoc_lm-tuned/tuning.md's adam and sgd lrs
    "+optimizers.adam.lr=0.006 +optimizers.sgd.lr=0.5 +optimizers.sgd.momentum=0.9"
)
SHIPPED = {
    "adagrad_schedule": (
        f"{RESNET8} +optimizers.adagrad.lr=0.01 +optimizers.adagrad.momentum=0.9 "
        f"+optimizers.sgd.lr=0.03 +optimizers.sgd.momentum=0.9 {RESNET8_LOGS} "
        "schedule=constant schedule.warmup_steps=0 trainer.max_steps=600 trainer.eval_every=200",
        ["sgd#adagrad"],
        [0, 1, 2],
    ),
    "bert_base": (
        "task=bert_base +optimizers.adagrad.lr=0.01 +optimizers.adagrad.momentum=0.9 "
        "+optimizers.adam.lr=0.0001 +optimizers.sgd.lr=0.1 +optimizers.sgd.momentum=0.9",
        9,
        [0],
    ),
    "bert_sgd_static": (
        "task=bert_base +optimizers.adam.lr=0.0001 +optimizers.sgd.lr=0.1 "
        "+optimizers.sgd.momentum=0.9 trainer.log_norms_every=100",
        ["adam#sgd"],
        [0],
    ),
    "digits_resnet": (
        f"{DIGITS} +optimizers.adagrad.lr=0.01 +optimizers.adagrad.momentum=0.9 "
        f"+optimizers.adam.lr=0.001 +optimizers.sgd.lr=0.1 +optimizers.sgd.momentum=0.9 "
        f"{DIGITS_BUDGET} trainer.log_norms_every=10 logger=none",
        9,
        [0, 1, 2],
    ),
    "digits_resnet_5x5": (
        f"{DIGITS} +optimizers.adagrad.lr=0.01 +optimizers.adagrad.momentum=0.9 "
        "+optimizers.adam.lr=0.001 +optimizers.lamb.lr=0.001 +optimizers.lars.lr=1.0 "
        "+optimizers.lars.momentum=0.9 +optimizers.sgd.lr=0.1 +optimizers.sgd.momentum=0.9 "
        f"{DIGITS_BUDGET} trainer.log_norms_every=10 logger=none",
        25,
        [0, 1, 2],
    ),
    "digits_resnet8": (f"{RESNET8} {RESNET8_TUNED} {RESNET8_LOGS}", 9, SIXTEEN),
    "digits_resnet8_global": (
        f"{RESNET8} {RESNET8_TUNED} {RESNET8_LOGS} graft=global",
        9,
        SIXTEEN,
    ),
    "digits_static": (
        f"{RESNET8} +optimizers.adam.lr=0.005 +optimizers.sgd.lr=0.03 "
        f"+optimizers.sgd.momentum=0.9 {RESNET8_LOGS}",
        ["adam#sgd"],
        EIGHT,
    ),
    "digits_tuning_transfer": (
        f"{RESNET8} +optimizers.adagrad.momentum=0.9 +optimizers.sgd.lr=0.03 "
        f"+optimizers.sgd.momentum=0.9 {RESNET8_LOGS}",
        ["sgd#adagrad"],
        EIGHT,
    ),
    "imagenet_resnet50": (
        "task=imagenet_resnet50 +optimizers.adagrad.lr=0.04 +optimizers.adagrad.momentum=0.9 "
        "+optimizers.adam.lr=0.004 +optimizers.sgd.lr=1.6 +optimizers.sgd.momentum=0.9",
        9,
        [0],
    ),
    "tiny_bert": (
        "task=tiny_bert +optimizers.adagrad.lr=0.01 +optimizers.adagrad.momentum=0.9 "
        "+optimizers.adam.lr=0.001 +optimizers.sgd.lr=0.1 +optimizers.sgd.momentum=0.9 "
        "trainer.log_norms_every=25 logger=none",
        9,
        [0, 1, 2],
    ),
    "pydoc_lm": (
        "task=pydoc_lm +optimizers.adagrad.lr=0.001 +optimizers.adagrad.momentum=0.9 "
        "+optimizers.adam.lr=0.01 +optimizers.sgd.lr=0.3 +optimizers.sgd.momentum=0.9 "
        f"{PYDOC_LM_LOGS}",
        9,
        [0, 1, 2, 3, 4],
    ),
    "pydoc_lm_static": (
        f"task=pydoc_lm {PYDOC_LM_STATIC_TUNED} {PYDOC_LM_LOGS}",
        ["adam#sgd"],
        [0, 1, 2, 3, 4],
    ),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_shipped_experiment_gives_its_runs_the_pinned_settings(name):
    shared, cells, seeds = SHIPPED[name]
    experiment = load_experiment(name)
    assert experiment.shared_overrides([]) == shared.split()
    assert (
        len(experiment.cell_names()) if isinstance(cells, int) else experiment.cell_names()
    ) == cells
    assert experiment.seeds == seeds


def test_every_shipped_experiment_is_pinned():
    assert sorted(SHIPPED) == available()


def test_shipped_tuned_learning_rates_are_the_ones_their_records_chose():
    for name, record in [
        ("digits_resnet8_global", "digits_resnet8-tuned"),
        ("digits_static", "digits_resnet8-tuned"),
        ("digits_tuning_transfer", "digits_resnet8-tuned"),
        ("pydoc_lm_static", "pydoc_lm-tuned"),
    ]:
        chosen = chosen_lrs((publish.RESULTS / record / "tuning.md").read_text())
        taken = {
            optimizer: settings["lr"]
            for optimizer, settings in load_experiment(name).optimizers.items()
            if "lr" in settings
        }
        assert taken and taken == {optimizer: chosen[optimizer] for optimizer in taken}, name


def test_an_experiment_extends_a_base_its_own_override_replacing_the_line_of_its_key(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base/small.yaml").write_text(
        "task: digits_resnet\nseeds: [0, 1]\nmetrics: [eval/top1]\n"
        "overrides: [trainer.max_steps=3, logger=none, trainer.log_norms_every=1]\n"
    )
    path = tmp_path / "small_grid.yaml"
    path.write_text(
        "name: small_grid\nextends: base/small.yaml\ngrid: {magnitude: [sgd], direction: [adam]}\n"
        "seeds: [3]\noverrides: [schedule=constant, +trainer.log_norms_every=5]\n"
    )
    experiment = load_experiment(str(path))
    assert (experiment.task, experiment.seeds, experiment.metrics) == (
        "digits_resnet",
        [3],  # the file's key replaces the base's
        ["eval/top1"],
    )
    assert experiment.overrides == [
        "trainer.max_steps=3",
        "logger=none",
        "+trainer.log_norms_every=5",  # in the base line's place
        "schedule=constant",
    ]
    assert "extends" not in experiment.document
    assert experiment.document["overrides"] == experiment.overrides


def test_lr_tuned_is_the_learning_rate_the_tuning_record_chose(tmp_path):
    record = tmp_path / "results/tiny-tuned"
    record.mkdir(parents=True)
    rows = [
        table_row("adam", 0.001, None, False),
        table_row("adam", 0.003, 0.05, True),
        table_row("sgd", 0.03, 0.04, True),
        table_row("sgd", 0.1, 0.1, False),
    ]
    (record / "tuning.md").write_text("\n".join(["# tiny", *table_header("eval/loss"), *rows]))
    path = write_experiment(tmp_path)
    path.write_text(
        path.read_text().replace(
            "sgd: {lr: 0.05, momentum: 0.5}", "sgd: {lr: tuned, momentum: 0.5}\n  adam: {lr: tuned}"
        )
        + f"tuned_from: {record}\n"
    )
    experiment = load_experiment(str(path))
    assert experiment.optimizers == {"sgd": {"lr": 0.03, "momentum": 0.5}, "adam": {"lr": 0.003}}
    assert "+optimizers.adam.lr=0.003" in experiment.shared_overrides([])
    # The version a run folder is told apart by holds the values, not where they came from.
    assert "tuned_from" not in experiment.document
    assert experiment.document["optimizers"] == experiment.optimizers


def test_override_order_alone_is_not_another_version_of_an_experiment():
    def version(*lines):
        return comparable({"overrides": list(lines)})

    assert version("schedule=constant", "trainer.max_steps=5") == version(
        "trainer.max_steps=5", "schedule=constant"
    )
    # Where two lines touch one key, the order decides the value: it still counts.
    assert version("trainer.max_steps=5", "trainer.max_steps=6") != version(
        "trainer.max_steps=6", "trainer.max_steps=5"
    )
    assert version("trainer={max_steps: 5}", "trainer.max_steps=6") != version(
        "trainer.max_steps=6", "trainer={max_steps: 5}"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_experiment"], "unknown experiment 'no_such_experiment'; available: "),
        (["digits_resnet", "trainer.no_such_key=1"], "Could not override 'trainer.no_such_key'"),
    ],
)
def test_graft_grid_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "graft.grid.run", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_learning_rate_left_null_must_be_set_before_running(tmp_path):
    path = write_experiment(tmp_path, sgd_lr=None)
    with pytest.raises(UserError, match="optimizers.sgd.lr is null .*set it"):
        run_grid(load_experiment(str(path)), [], outputs=tmp_path, results_root=tmp_path)
    assert sorted(tmp_path.iterdir()) == [path]


def test_an_unknown_optimizer_in_a_grid_is_named(tmp_path):
    path = write_experiment(tmp_path)
    path.write_text(path.read_text().replace("magnitude: [sgd, adam]", "magnitude: [sgd, adamx]"))
    with pytest.raises(
        UserError, match="grid.magnitude: unknown optimizer 'adamx'; allowed: adagrad, adam"
    ):
        load_experiment(str(path))


def test_a_table_says_where_its_learning_rates_come_from():
    from graft.grid.table import learning_rates_line

    assert learning_rates_line(load_experiment("digits_resnet"), tuned=False).startswith(
        "**Untuned**: the learning rates are the experiment file's (digits_resnet.yaml)"
    )
    # An experiment that reads `lr: tuned` from another's record names the record.
    assert learning_rates_line(load_experiment("digits_static"), tuned=False).startswith(
        "**Tuned elsewhere**: each `lr: tuned` in digits_static.yaml is the one "
        "results/digits_resnet8-tuned/tuning.md chose"
    )
