"""Tuning (graft/grid/tune.py): bracketing, failed seeds, reruns; the provenance of runs and
results (graft/common/provenance.py); scripts/reproduce_cpu.sh's checks and its run loop."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import graft.grid.tune as tune
from graft.common.errors import UserError
from graft.common.provenance import commits, git_sha
from graft.grid.experiment import load_experiment
from graft.grid.run import run_grid
from graft.grid.tuning_record import chosen_lrs, record_budget, record_choices

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / "scripts/reproduce_cpu.sh"


def loss_at(best: float, fails_above: float = math.inf):
    """A run stand-in: loss = distance of log10(lr) from log10(best), per seed; None (failed)
    above `fails_above`. Records every value it is asked to run."""
    asked: list[list[float]] = []

    def run(values: list[float]) -> dict[float, list[float | None]]:
        asked.append(list(values))
        return {v: [None if v > fails_above else abs(math.log10(v / best))] * 2 for v in values}

    return run, asked


# --- choosing and bracketing ------------------------------------------------------------------


def test_a_choice_inside_the_list_is_bracketed_and_runs_nothing_more():
    run, asked = loss_at(best=0.1)
    choice = tune.choose("sgd", [0.3, 0.03, 0.1], extend=2, lower=True, run=run)
    assert (choice.chosen, choice.outcome) == (0.1, "bracketed")
    assert asked == [[0.03, 0.1, 0.3]]  # sorted: the ends are the smallest and largest


def test_a_choice_at_the_upper_end_is_extended_by_the_ratio_of_the_last_two_values():
    run, asked = loss_at(best=0.1)
    choice = tune.choose("sgd", [0.01, 0.03], extend=2, lower=True, run=run)
    # 0.03 wins at the upper end -> 0.09 (x3) wins at the upper end -> 0.27 loses: bracketed.
    assert asked == [[0.01, 0.03], [0.09], [0.27]]
    assert (choice.chosen, choice.bracketed) == (0.09, True)
    assert [(t.value, t.tried) for t in choice.trials] == [
        (0.01, "listed"),
        (0.03, "listed"),
        (0.09, "extension 1 (above)"),
        (0.27, "extension 2 (above)"),
    ]


def test_an_extension_below_is_rounded_to_four_significant_digits():
    run, asked = loss_at(best=0.001)
    choice = tune.choose("adam", [0.3, 0.1], extend=1, lower=True, run=run)
    assert asked[1] == [0.03333]  # 0.1 x (0.1 / 0.3), not 0.033333333333333335
    assert str(asked[1][0]) == "0.03333"  # the folder name, the override and the record's
    assert choice.chosen == 0.03333
    assert choice.outcome == (
        "not bracketed: at the lower end of [0.03333, 0.1, 0.3] after 1 extension (tune.extend: 1)"
    )


def test_a_failed_extension_counts_as_worse_so_it_brackets():
    run, asked = loss_at(best=10.0, fails_above=0.05)
    choice = tune.choose("sgd", [0.01, 0.03], extend=2, lower=True, run=run)
    assert asked == [[0.01, 0.03], [0.09]]
    assert (choice.chosen, choice.outcome) == (0.03, "bracketed")
    assert choice.trials[-1].mean is None and choice.trials[-1].failed == 2


def test_when_the_extensions_run_out_the_choice_is_not_bracketed():
    run, asked = loss_at(best=10.0)
    choice = tune.choose("sgd", [0.01, 0.03], extend=2, lower=True, run=run)
    assert asked == [[0.01, 0.03], [0.09], [0.27]]
    assert choice.chosen == 0.27 and not choice.bracketed
    assert choice.outcome == (
        "not bracketed: at the upper end of [0.01, 0.03, 0.09, 0.27] after 2 extensions "
        "(tune.extend: 2)"
    )
    run, asked = loss_at(best=10.0)
    assert "after 0 extensions" in tune.choose("sgd", [0.01, 0.03], 0, True, run).outcome
    assert asked == [[0.01, 0.03]]


def test_an_extension_that_rounds_onto_a_tried_value_is_not_possible():
    run, asked = loss_at(best=10.0)
    choice = tune.choose("sgd", [1.0, 1.00001], extend=2, lower=True, run=run)
    assert asked == [[1.0, 1.00001]]
    assert choice.chosen == 1.00001
    assert choice.outcome.startswith("not bracketed: at the upper end of [1.0, 1.00001]; ")
    assert "extension not possible" in choice.outcome and "already tried" in choice.outcome


def test_highest_wins_for_an_accuracy_and_equal_means_go_to_the_first_tried():
    def run(values):
        return {v: [1.0 if v < 0.2 else 0.5] for v in values}

    choice = tune.choose("sgd", [0.03, 0.1, 0.3], extend=2, lower=False, run=run)
    # 0.03 and 0.1 tie at 1.0: 0.03 (tried first) is at the lower end; 0.009 ties too and is
    # tried later, so 0.03 stays, now bracketed by 0.009 below.
    assert [t.value for t in choice.trials] == [0.03, 0.1, 0.3, 0.009]
    assert (choice.chosen, choice.outcome) == (0.03, "bracketed")


def test_a_value_with_any_failed_seed_counts_as_failed():
    trial = tune.Trial(0.1, [0.5, None, 0.7])
    assert trial.mean is None and trial.failed == 1
    assert tune.Trial(0.1, [0.5, 0.7]).mean == pytest.approx(0.6)
    with pytest.raises(UserError, match=r"tuning sgd: every learning rate in \[0.01, 0.03"):
        tune.choose("sgd", [0.01, 0.03], 2, True, lambda values: {v: [None] for v in values})


# --- the sweep and its record, the runs faked -------------------------------------------------

EXPERIMENT = """
name: tiny
task: digits_resnet
grid: {magnitude: [sgd, adam], direction: [sgd, adam]}
seeds: [0]
metrics: [eval/loss]
overrides: [trainer.max_steps=3, logger=none]
tune:
  lr: {sgd: [0.01, 0.03], adam: [0.001, 0.003, 0.01]}
  seeds: [0, 1]
"""


def fake_multirun(loss, calls: list):
    """graft-grid's multirun with each job's summary.json written instead of a run: its folder
    resolved from the subdir as Hydra does (the value parsed from the override, then put in
    the folder name by OmegaConf), its eval/loss = loss(optimizer, lr, seed) (None: diverged)."""

    def multirun(overrides: list[str], sweep_dir: Path, subdir: str) -> int:
        calls.append(overrides)
        parser = OverridesParser.create()
        parsed = {o.key_or_group: o for o in parser.parse_overrides(overrides)}
        (name,) = [key.split(".")[1] for key in parsed if key.endswith(".lr") and key in parsed]
        lr = parsed[f"optimizers.{name}.lr"]
        lrs = list(lr.sweep_iterator()) if lr.is_sweep_override() else [lr.value()]
        seed = parsed["trainer.seed"]
        seeds = list(seed.sweep_iterator()) if seed.is_sweep_override() else [seed.value()]
        for value in lrs:
            for k in seeds:
                config = {"optimizers": {name: {"lr": value}}, "trainer": {"seed": k}}
                folder = OmegaConf.create({**config, "subdir": subdir.strip("'")}).subdir
                result = loss(name, value, k)
                summary = (
                    {"status": "finished", "eval/loss": result}
                    if result is not None
                    else {"status": "diverged", "error": "non-finite training loss at step 2"}
                )
                (sweep_dir / folder).mkdir(parents=True)
                (sweep_dir / folder / "summary.json").write_text(json.dumps(summary))
        return 0

    return multirun


def loss(name: str, lr: float, seed: int) -> float | None:
    """SGD best near 0.09 (diverges above 0.2); Adam best at 0.003; seed 1 of Adam's 0.01
    diverges."""
    if name == "adam" and lr == 0.01 and seed == 1:
        return None
    if name == "sgd" and lr > 0.2:
        return None
    best = 0.09 if name == "sgd" else 0.003
    return 1.0 + abs(math.log10(lr / best)) + 0.01 * seed


def test_the_sweep_extends_records_and_a_rerun_reaches_the_same_choice(tmp_path, monkeypatch):
    path = tmp_path / "tiny.yaml"
    path.write_text(EXPERIMENT)
    experiment = load_experiment(str(path))
    calls: list[list[str]] = []
    monkeypatch.setattr(tune, "multirun", fake_multirun(loss, calls))
    chosen, text = tune.run_tuning(experiment, [], tmp_path / "outputs")
    assert chosen == {"adam": 0.003, "sgd": 0.09}
    assert chosen_lrs(text) == chosen
    # Each extension is a real run folder, named as its override and its row name it.
    sgd = tmp_path / "outputs/tuning/sgd"
    assert sorted(p.name for p in sgd.iterdir()) == ["lr0.01", "lr0.03", "lr0.09", "lr0.27"]
    assert sorted(p.name for p in (sgd / "lr0.27").iterdir()) == ["seed0", "seed1"]
    assert [c[-2] for c in calls] == [
        "+optimizers.adam.lr=0.001,0.003,0.01",
        "+optimizers.sgd.lr=0.01,0.03",
        "+optimizers.sgd.lr=0.09",
        "+optimizers.sgd.lr=0.27",
    ]
    assert "| sgd | 0.09 | 1.0050 | **chosen** | extension 1 (above) |" in text
    assert "| sgd | 0.27 | failed (2 of 2 seeds) |  | extension 2 (above) |" in text
    assert "| adam | 0.01 | failed (1 of 2 seeds) |  | listed |" in text
    assert record_choices(text) == ["adam: 0.003, bracketed", "sgd: 0.09, bracketed"]
    assert record_budget(text).startswith("the grid's own")

    # A rerun starts no run (every value has ended) and writes the same record.
    def refuse(*args):
        raise AssertionError("a finished tuning run was started again")

    monkeypatch.setattr(tune, "multirun", refuse)
    assert tune.run_tuning(experiment, [], tmp_path / "outputs") == (chosen, text)


def test_tuning_at_another_budget_says_so_and_names_the_overrides(tmp_path, monkeypatch):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        EXPERIMENT.replace("seeds: [0, 1]", "seeds: [0]\n  overrides: [trainer.max_steps=2]")
        + "  extend: 0\n"
    )
    monkeypatch.setattr(tune, "multirun", fake_multirun(loss, []))
    _, text = tune.run_tuning(load_experiment(str(path)), [], tmp_path / "outputs")
    assert record_budget(text).startswith(
        "not the grid's: the tuning runs add tune.overrides [trainer.max_steps=2]"
    )
    assert (
        "sgd: 0.03, not bracketed: at the upper end of [0.01, 0.03] after 0 extensions"
        in (record_choices(text)[1])
    )


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("lr: {sgd: [0.1]}", "tune.lr.sgd: [0.1] is not a list of at least two learning rates"),
        ("lr: {sgd: [0.1, 0.3]}, extend: -1", "tune.extend: -1 is not an integer >= 0"),
        ("lr: {sgd: [0.1, 0.3]}, extend: 1.5", "tune.extend: 1.5 is not an integer >= 0"),
    ],
)
def test_a_tune_block_is_checked_when_the_file_loads(tmp_path, block, message):
    path = tmp_path / "tiny.yaml"
    path.write_text(EXPERIMENT[: EXPERIMENT.index("tune:")] + f"tune: {{{block}}}\n")
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        load_experiment(str(path))


# --- real runs: an extension's folder from Hydra, each run's provenance, the table's header ----


@pytest.mark.slow
def test_a_tuned_grid_of_real_runs_records_its_choices_and_provenance(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "name: tiny\ntask: digits_resnet\ngrid: {magnitude: [sgd], direction: [sgd]}\n"
        "seeds: [0]\nmetrics: [eval/loss]\n"
        "overrides: [trainer.max_steps=3, trainer.batch_size=8, logger=none, "
        "trainer.progress=false, trainer.eval_every=3]\n"
        # Three steps from a tiny lr: the larger one wins, so the sweep goes up once.
        "tune: {lr: {sgd: [1.0e-5, 3.0e-5]}, extend: 1}\n"
        # A table lr, as the shipped grids have: the single-value extension replaces it.
        "optimizers: {sgd: {lr: 0.1, momentum: 0.9}}\n"
    )
    written = run_grid(
        load_experiment(str(path)),
        [],
        outputs=tmp_path / "outputs",
        results_root=tmp_path / "results",
        tune=True,
    )
    tuning = (written.folder / "tuning.md").read_text()
    extension = tmp_path / "outputs/tiny/tuning/sgd/lr9e-05/seed0"  # 3e-5 x 3, named by Hydra
    assert json.loads((extension / "summary.json").read_text())["status"] == "finished"
    assert "| sgd | 9e-05 |" in tuning and "extension 1 (above)" in tuning
    (choice,) = record_choices(tuning)
    assert choice.startswith("sgd: 9e-05, not bracketed: at the upper end of [1e-05, 3e-05, 9e-05]")
    table = (written.folder / "table.md").read_text()
    header = table.split("\n\n")[1]  # the learning-rate line, under the title
    assert "Tuning budget: the grid's own" in header and f"Chosen: {choice}." in header

    summary = json.loads((tmp_path / "outputs/tiny/tuned/sgd#sgd/seed0/summary.json").read_text())
    assert summary["git_sha"] == git_sha()  # this checkout, "-dirty" only for code changes
    assert summary["versions"]["torch"] == metadata.version("torch")
    threads = summary["hardware"]["cpu_threads"]
    assert isinstance(threads, int) and threads >= 1
    if os.environ.get("OMP_NUM_THREADS"):
        assert threads == int(os.environ["OMP_NUM_THREADS"])
    assert summary["wall_seconds"] > 0
    provenance = json.loads((written.folder / "provenance.json").read_text())
    (run,) = provenance["run_provenance"].values()
    assert run == {
        "git_sha": summary["git_sha"],
        "torch": metadata.version("torch"),
        "threads": threads,
        "wall_seconds": summary["wall_seconds"],
    }
    clean = not summary["git_sha"].endswith("-dirty")
    assert (provenance["clean"], provenance["git_shas"]) == (clean, [summary["git_sha"]])
    # The warning follows it, before the experiment's description.
    assert ("\n\n**Provenance warning**: " in table.split("The diagonal")[0]) is not clean


# --- what counts as a clean checkout ----------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git repository with a tracked file in graft/, results/ and outputs/, committed."""
    repo = tmp_path / "repo"
    for name in ("graft/code.py", "results/grid/table.md", "outputs/kept.txt"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("one\n")
    git(repo, "init", "-q")
    git(repo, "add", "-f", ".")
    git(repo, "commit", "-qm", "start")
    return repo


def test_only_changes_outside_results_and_outputs_make_a_checkout_dirty(checkout):
    head = git(checkout, "rev-parse", "HEAD").strip()
    assert git_sha(checkout) == head
    (checkout / "results/grid/table.md").write_text("regenerated\n")
    (checkout / "results/new.md").write_text("untracked\n")
    (checkout / "outputs/kept.txt").write_text("changed\n")
    (checkout / "notes.txt").write_text("untracked, outside\n")
    assert git_sha(checkout) == head
    (checkout / "graft/code.py").write_text("two\n")
    assert git_sha(checkout) == head + "-dirty"
    assert git_sha(checkout.parent) is None  # not a checkout


def test_commits_is_clean_only_for_one_commit_without_changes():
    assert commits(["a", "a"]) == (True, ["a"])
    assert commits(["a", "b", "a"]) == (False, ["a", "b"])
    assert commits(["a-dirty"]) == (False, ["a-dirty"])
    assert commits(["a", None]) == (False, ["a", "unknown"])
    assert commits([]) == (False, [])


# --- scripts/reproduce_cpu.sh -----------------------------------------------------------------


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.fixture
def script_checkout(checkout) -> Path:
    """`checkout` with the script and the experiment files, committed."""
    (checkout / "scripts").mkdir()
    shutil.copy2(SCRIPT, checkout / "scripts")
    shutil.copytree(REPOSITORY / "experiments", checkout / "experiments")
    git(checkout, "add", ".")
    git(checkout, "commit", "-qm", "script")
    return checkout


def reproduce(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(repo / "scripts/reproduce_cpu.sh"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


def test_a_dry_run_prints_each_experiments_command_by_stage(script_checkout):
    result = reproduce(script_checkout, "--dry-run", "-j", "3", "-o", "/tmp/fresh")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("reproduce_cpu: commit ") and "up to 3 at once" in lines[0]
    commands = [line.split(" -m graft.grid.run ")[1] for line in lines if " -m " in line]
    assert commands == [
        "pydoc_lm --tune --force > logs/pydoc_lm-tuned.log",
        "digits_resnet8 --tune --force > logs/digits_resnet8-tuned.log",
        "adagrad_schedule --force > logs/adagrad_schedule.log",
        "pydoc_lm_static --force > logs/pydoc_lm_static.log",
        "digits_resnet8_global --force > logs/digits_resnet8_global.log",
        "digits_static --force > logs/digits_static.log",
        "digits_tuning_transfer --force > logs/digits_tuning_transfer.log",
    ]
    assert lines.index("stage 2:") == 5
    assert all("cd /tmp/fresh && OMP_NUM_THREADS=1 " in line for line in lines if " -m " in line)


def test_the_shipped_list_is_every_committed_results_folder():
    folders = sorted(p.name for p in (REPOSITORY / "results").iterdir() if p.is_dir())
    script = SCRIPT.read_text()
    listed = script[script.index("FOLDERS=(") : script.index(")", script.index("FOLDERS=("))]
    assert sorted(word for word in listed.split()[1:] if word != "wait") == folders


@pytest.mark.parametrize(
    ("change", "args", "message"),
    [
        (
            "experiments/tiny_bert.yaml",
            [],
            "changed file(s) outside results/ and outputs/ (experiments/tiny_bert.yaml)",
        ),
        (None, ["nosuch"], "unknown results folder nosuch: no experiments/nosuch.yaml"),
        (None, ["digits_static", "digits_resnet8-tuned"], "digits_static reads results/"),
        (None, ["digits_static", "wait", "digits_static"], "digits_static is listed twice"),
        (None, ["-j", "0"], "-j 0: not a whole number >= 1"),
        (None, ["--jobs"], "unknown option --jobs"),
    ],
)
def test_the_script_refuses_in_one_line(script_checkout, change, args, message):
    if change:
        with open(script_checkout / change, "a") as handle:
            handle.write("# edited\n")
    result = reproduce(script_checkout, "--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("reproduce_cpu: error: ") and message in line


def test_a_change_under_results_is_not_refused(script_checkout):
    (script_checkout / "results/grid/table.md").write_text("regenerated\n")
    result = reproduce(
        script_checkout, "--dry-run", "digits_resnet8-tuned", "wait", "digits_static"
    )
    assert result.returncode == 0, result.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
# "python -m graft.grid.run NAME ... --force": logs its arguments and threads; NAME=tiny_bert fails
echo "$PWD $OMP_NUM_THREADS $*" >> "$FAKE_LOG"
[[ $3 != tiny_bert ]]
"""


def test_the_script_runs_each_experiment_and_writes_its_wall_time(script_checkout, tmp_path):
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log, work = tmp_path / "calls.log", tmp_path / "work"
    args = ["-j", "2", "-t", "3", "-o", str(work), "digits_resnet-tuned", "adagrad_schedule"]
    env = {"PYTHON": str(python), "FAKE_LOG": str(log)}
    result = reproduce(script_checkout, *args, **env)
    assert result.returncode == 0, result.stderr
    calls = sorted(log.read_text().splitlines())
    assert calls == [
        f"{work} 3 -m graft.grid.run adagrad_schedule --force",
        f"{work} 3 -m graft.grid.run digits_resnet --tune --force",
    ]
    assert "reproduce_cpu: adagrad_schedule: finished in 0 s" in result.stdout
    table = (script_checkout / "results/WALL_TIMES.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and " | `" in line]
    assert [row.split(" | ")[0:2] for row in rows] == [
        ["| adagrad_schedule", "`graft-grid adagrad_schedule --force`"],
        ["| digits_resnet-tuned", "`graft-grid digits_resnet --tune --force`"],
    ]
    assert all(row.split(" | ")[3:5] == ["3", "2"] and " | finished | " in row for row in rows)
    # A second regeneration, one of whose experiments fails: exit 1, its row replaced, the
    # other rows kept; the fresh folder must be fresh.
    assert reproduce(script_checkout, *args, **env).returncode == 2
    shutil.rmtree(work)
    failed = reproduce(script_checkout, "-o", str(work), "tiny_bert-tuned", **env)
    assert failed.returncode == 1
    assert "1 experiment(s) failed" in failed.stderr
    table = (script_checkout / "results/WALL_TIMES.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and " | `" in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| adagrad_schedule",
        "| digits_resnet-tuned",
        "| tiny_bert-tuned",
    ]
    assert " | failed (exit 1) | " in rows[2]
    assert (work / "logs/tiny_bert-tuned.log").is_file()
