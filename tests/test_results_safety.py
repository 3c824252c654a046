"""Results are written in one piece, counted before they are replaced, and failed runs say
where their reason is; every command prints its usage on --help (graft/grid/publish.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from graft.common.errors import UserError
from graft.grid import compare, publish, run, table
from graft.grid.publish import finished_in, refuse_to_shrink, replace_folder, tuned_in, write_files
from graft.grid.table import failure_of, gather_runs
from graft.transfer import cli as static_cli
from tests.refusals import tree_hashes


def old_results(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "table.md").write_text("# old\n")
    (folder / "provenance.json").write_text(json.dumps({"runs": {"a": {}, "b": {}}}))
    return folder


def test_a_build_that_fails_half_way_leaves_the_old_folder_and_no_trace(tmp_path):
    target = old_results(tmp_path / "results/exp")
    before = tree_hashes([tmp_path])

    def build(folder: Path) -> None:
        (folder / "table.md").write_text("# new, half written")
        raise RuntimeError("the plot failed")

    with pytest.raises(RuntimeError, match="the plot failed"):
        replace_folder(target, build)
    assert tree_hashes([tmp_path]) == before  # no hidden .exp.new-* folder left either


def test_an_os_error_while_building_is_one_line_and_changes_nothing(tmp_path):
    target = old_results(tmp_path / "results/exp")
    before = tree_hashes([tmp_path])

    def build(folder: Path) -> None:
        (folder / "no/such/folder/table.md").write_text("x")

    with pytest.raises(UserError, match=r"could not write .*exp .*nothing there was changed"):
        replace_folder(target, build)
    assert tree_hashes([tmp_path]) == before


def test_a_new_folder_replaces_the_old_whole_keeping_only_what_keep_names(tmp_path):
    target = old_results(tmp_path / "exp")
    (target / "tuning.md").write_text("# tuning\n")
    (target / "stale.png").write_text("old plot")

    def build(folder: Path) -> None:
        (folder / "table.md").write_text("# new\n")

    replace_folder(target, build, keep=["tuning.md"])
    assert sorted(path.name for path in target.iterdir()) == ["table.md", "tuning.md"]
    assert (target / "table.md").read_text() == "# new\n"
    assert [path.name for path in tmp_path.iterdir()] == ["exp"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_a_results_folder_is_counted_from_provenance_then_table_csv(tmp_path):
    assert finished_in(tmp_path / "absent") == 0
    grid = old_results(tmp_path / "grid")
    assert finished_in(grid) == 2
    csv_only = tmp_path / "csv"
    csv_only.mkdir()
    (csv_only / "table.csv").write_text(
        "magnitude,direction,metric,mean,std,seeds,reference\n"
        "adam,sgd,eval/top1,0.5,,3,\nadam,sgd,eval/loss,0.5,,2,\nsgd,sgd,eval/top1,,,0,\n"
    )
    assert finished_in(csv_only) == 3  # the most seeds any metric of a cell has
    study = tmp_path / "study"  # a study writes table.md and provenance.json, no table.csv
    study.mkdir()
    (study / "table.md").write_text("# study\n")
    assert finished_in(study) is None
    (study / "provenance.json").write_text(json.dumps({"runs": {"x": {}}}))
    assert finished_in(study) == 1


def test_tuned_results_are_told_by_provenance_run_folders_or_tuning_md(tmp_path):
    folder = old_results(tmp_path / "exp")
    assert tuned_in(folder) is False
    (folder / "provenance.json").write_text(json.dumps({"runs": {"outputs/e/tuned/a#a/seed0": 1}}))
    assert tuned_in(folder) is True
    (folder / "provenance.json").write_text(json.dumps({"tuned": False, "runs": {}}))
    assert tuned_in(folder) is False


def test_fewer_finished_runs_are_refused_naming_both_counts_unless_forced(tmp_path):
    folder = old_results(tmp_path / "exp")
    with pytest.raises(UserError, match=r"holds 2 finished runs, the new results 1 of 4.*--force"):
        refuse_to_shrink(folder, 1, 4, tuned=False, force=False, redo="graft-table exp")
    refuse_to_shrink(folder, 1, 4, tuned=False, force=True, redo="graft-table exp")
    refuse_to_shrink(folder, 2, 4, tuned=False, force=False, redo="graft-table exp")
    with pytest.raises(UserError, match="holds untuned results and these are tuned"):
        refuse_to_shrink(folder, 2, 4, tuned=True, force=False, redo="graft-table exp --tuned")


def test_write_files_renames_every_file_into_place_or_none(tmp_path):
    out = tmp_path / "new/out"

    def fails(path: Path) -> None:
        raise RuntimeError("no plot")

    with pytest.raises(RuntimeError):
        write_files(out, {"a.md": lambda path: path.write_text("a"), "b.png": fails})
    assert not (tmp_path / "new").exists()  # the folders it made are gone too
    write_files(out, {"a.md": lambda path: path.write_text("a")})
    assert [path.name for path in out.iterdir()] == ["a.md"]


def summary(run_dir: Path, **content) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(content))


def test_each_failure_says_why_in_short_and_where_the_full_reason_is(tmp_path):
    summary(tmp_path / "seed0", status="finished", **{"eval/loss": 0.5})
    summary(tmp_path / "seed1", status="diverged", error="non-finite training loss at step 3")
    (tmp_path / "seed1/error.log").write_text("non-finite training loss at step 3\nTraceback...")
    (tmp_path / "seed2").mkdir()  # killed before it wrote anything
    (tmp_path / "seed3").mkdir()
    (tmp_path / "seed3/error.log").write_text("x" * 300 + "\ndetails\n")  # no summary.json
    summary(tmp_path / "seed4", status="failed", error="boom\n" + "trace " * 100)
    (tmp_path / "seed5").mkdir()
    (tmp_path / "seed5/summary.json").write_text('{"status": "fin')  # torn
    runs = gather_runs(tmp_path, [0, 1, 2, 3, 4, 5, 6], ["eval/loss"])
    assert runs.run_dirs == [tmp_path / "seed0"] and runs.started == 6
    failures = {failure.seed: failure for failure in runs.failures}
    assert str(failures[1]) == (
        f"seed 1: non-finite training loss at step 3 ({tmp_path / 'seed1/error.log'})"
    )
    killed = "did not start or was killed (no summary.json, no error.log)"
    assert str(failures[2]) == f"seed 2: {killed} ({tmp_path / 'seed2'})"
    assert failures[3].reason == "x" * 97 + "..." and failures[3].where.name == "error.log"
    assert failures[4].reason == "boom" and failures[4].where == tmp_path / "seed4"
    assert failures[5].reason == "summary.json is unreadable"
    assert failures[6].reason == "not run (no run folder)"
    assert runs.text("eval/loss") == "0.5000 (seed 1, 2, 3, 4, 5, 6 failed)"
    assert failure_of(tmp_path / "seed0", 0) is None


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (run.main, ["graft-grid", "--help"]),
        (run.main, ["graft-grid", "digits_resnet", "-h"]),
        (table.main, ["graft-table", "--help"]),
        (compare.main, ["graft-compare", "-h"]),
        (static_cli.main, ["graft-static", "--help"]),
        (static_cli.main, ["graft-static", "derive", "--help"]),
    ],
)
def test_help_prints_the_usage_and_exits_0(main, argv, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"usage: {' '.join(a for a in argv if not a.startswith('-') and a != 'digits_resnet')}"
    )
    assert "--force" in out or argv[0] == "graft-static"
    assert not list(tmp_path.iterdir())


def test_graft_grid_takes_the_experiment_overrides_and_flags_in_any_order(monkeypatch):
    seen = {}

    def fake_run_grid(experiment, overrides, *, tune, force):
        seen.update(name=experiment.name, overrides=overrides, tune=tune, force=force)
        return table.Written(Path("results"), 1, 1, [])

    monkeypatch.setattr(run, "run_grid", fake_run_grid)
    for argv in (
        ["digits_resnet", "trainer.max_steps=5", "--tune"],
        ["--tune", "digits_resnet", "trainer.max_steps=5"],
        ["digits_resnet", "--tune", "trainer.max_steps=5"],
    ):
        monkeypatch.setattr(sys, "argv", ["graft-grid", *argv])
        run.main()
        assert seen == {
            "name": "digits_resnet",
            "overrides": ["trainer.max_steps=5"],
            "tune": True,
            "force": False,
        }
    monkeypatch.setattr(sys, "argv", ["graft-grid", "hydra/launcher=slurm", "--force"])
    run.main()  # the default experiment
    assert seen["name"] == "digits_resnet" and seen["overrides"] == ["hydra/launcher=slurm"]
    assert seen["force"] is True
    assert publish.RESULTS.name == "results"
