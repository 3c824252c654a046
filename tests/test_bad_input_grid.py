"""A catalogue of realistic mistakes with graft-grid, graft-table, graft-compare and
graft-static: each ends with exit code 2 and one line `PROGRAM: error: ...` naming the bad
value, and leaves every file under the test's folders byte-identical (tests/refusals.py).

One tiny grid (adam x {sgd, adam}, one seed, two steps) runs once for the module; every case
calls a command's main() in-process against it.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from graft.grid import compare, publish, run, table
from graft.grid.experiment import load_experiment
from graft.transfer import cli as static_cli
from tests.refusals import assert_refused, read_only

CAT = """\
name: cat
description: A 1x2 grid of two steps.
task: digits_resnet
grid: {magnitude: [adam], direction: [sgd, adam]}
seeds: [0]
optimizers:
  sgd: {lr: 0.05, momentum: 0.5}
overrides: [trainer.max_steps=2, trainer.batch_size=8, logger=none, trainer.progress=false,
            trainer.log_every=1, trainer.log_norms_every=1, trainer.eval_every=2]
metrics: [eval/top1, eval/loss]
"""
OVERRIDES = CAT[CAT.index("overrides:") : CAT.index("metrics:")]
ONE_PAIR = CAT.replace("direction: [sgd, adam]", "direction: [sgd]")  # as a study needs
GRAFTED = "outputs/cat/adam#sgd/seed0"  # relative to the grid's folder


@pytest.fixture(scope="module")
def grid(module_tmp) -> Path:
    """A finished grid: cat.yaml, outputs/cat/, results/cat/, and a comparison in cmp/."""
    root = module_tmp
    (root / "cat.yaml").write_text(CAT)
    written = run.run_grid(
        load_experiment(str(root / "cat.yaml")), [], root / "outputs", root / "results"
    )
    assert written.finished == 2
    # The commands here never read the weights; hashing them for every case would be slow.
    for weights in [*root.glob("outputs/cat/*/seed0/checkpoints"), *root.rglob("*.safetensors")]:
        shutil.rmtree(weights) if weights.is_dir() else weights.unlink()
    compare.compare([root / "outputs/cat/adam#sgd"], root / "cmp")
    (root / "a_file").write_text("not a folder\n")
    return root


@dataclass
class Context:
    root: Path  # the module's grid (the current folder during a case)
    tmp: Path  # this case's own folder
    monkeypatch: pytest.MonkeyPatch

    def results_in(self, folder: Path) -> None:
        self.monkeypatch.setattr(publish, "RESULTS", folder)

    def outputs_in(self, folder: Path) -> None:
        self.monkeypatch.setattr(publish, "OUTPUTS", folder)

    def file(self, name: str, text: str) -> Path:
        """A file in the case's folder (its folders made); its path."""
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def experiment(self, text: str, name: str = "bad") -> str:
        """An experiment file written into the case's folder; its path."""
        path = self.tmp / f"{name}.yaml"
        path.write_text(text)
        return str(path)

    def variant(self, old: str, new: str) -> str:
        assert old in CAT, old
        return self.experiment(CAT.replace(old, new))

    def results_holding(self, files: dict[str, str]) -> None:
        """RESULTS points at the case's folder, whose results/cat/ holds these files."""
        folder = self.tmp / "results/cat"
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text)
        self.results_in(self.tmp / "results")


Setup = Callable[[Context], tuple[list[str], str]]  # -> (arguments after the program, bad)
PROGRAMS = {
    "graft-grid": run.main,
    "graft-table": table.main,
    "graft-compare": compare.main,
    "graft-static": static_cli.main,
}


def provenance(runs: int, tuned: bool | None = None) -> str:
    content: dict = {"runs": {f"outputs/cat/run{index}": {} for index in range(runs)}}
    if tuned is not None:
        content["tuned"] = tuned
    return json.dumps(content)


# (program, case name, setup). Mistakes in experiment files are spread over graft-grid and
# graft-table, which load them alike.
CASES: list[tuple[str, str, Setup]] = [
    # --- which experiment, which arguments
    ("graft-grid", "unknown experiment", lambda c: (["digits_resnett"], "'digits_resnett'")),
    ("graft-grid", "two experiments", lambda c: (["cat.yaml", "digits_resnet"], "digits_resnet")),
    ("graft-grid", "misspelt option", lambda c: (["cat.yaml", "--tunee"], "--tunee")),
    ("graft-grid", "hydra's -m", lambda c: (["cat.yaml", "-m"], "-m")),
    ("graft-grid", "a base, not an experiment", lambda c: (["base/digits"], "is a base")),
    ("graft-table", "no experiment", lambda c: ([], "experiment")),
    ("graft-table", "two experiments", lambda c: (["cat.yaml", "tiny_bert"], "tiny_bert")),
    ("graft-table", "unknown experiment", lambda c: (["no_such"], "'no_such'")),
    ("graft-table", "a study, not a grid", lambda c: (["digits_static"], "static study")),
    ("graft-table", "unknown option", lambda c: (["cat.yaml", "--tune"], "--tune")),
    # --- overrides
    (
        "graft-grid",
        "override of no key",
        lambda c: (["cat.yaml", "trainer.no_such_key=1"], "trainer.no_such_key"),
    ),
    (
        "graft-grid",
        "unparsable override",
        lambda c: (["cat.yaml", "trainer.max_steps=[1"], "'trainer.max_steps=[1'"),
    ),
    ("graft-grid", "unknown task", lambda c: (["cat.yaml", "task=nope"], "'nope'")),
    (
        "graft-grid",
        "unknown optimizer override",
        lambda c: (["cat.yaml", "optim@direction=adamx"], "'adamx'"),
    ),
    (
        "graft-grid",
        "another version of the experiment",
        lambda c: ([c.variant("lr: 0.05", "lr: 0.5")], "optimizers.sgd.lr"),
    ),
    ("graft-grid", "--tune without a tune block", lambda c: (["cat.yaml", "--tune"], "cat.yaml")),
    (
        "graft-grid",
        "a learning rate left null",
        lambda c: ([c.variant("lr: 0.05", "lr: null")], "optimizers.sgd.lr is null"),
    ),
    # --- experiment files
    (
        "graft-grid",
        "YAML syntax error",
        lambda c: ([c.variant("seeds: [0]", "seeds: [0")], "not valid YAML at line"),
    ),
    ("graft-table", "empty file", lambda c: ([c.experiment("")], "the file is empty")),
    ("graft-grid", "a list, not a mapping", lambda c: ([c.experiment("- cat\n")], "['cat']")),
    ("graft-table", "scalar seeds", lambda c: ([c.variant("seeds: [0]", "seeds: 0")], "seeds: 0")),
    (
        "graft-grid",
        "negative seed",
        lambda c: ([c.variant("seeds: [0]", "seeds: [0, -1]")], "seeds[1]: -1"),
    ),
    ("graft-table", "boolean seed", lambda c: ([c.variant("seeds: [0]", "seeds: [yes]")], "True")),
    (
        "graft-grid",
        "overrides as one string",
        lambda c: (
            [c.experiment(CAT.replace(OVERRIDES, "overrides: trainer.max_steps=2\n"))],
            "overrides: 'trainer.max_steps=2'",
        ),
    ),
    (
        "graft-table",
        "an override with a space",
        lambda c: (
            [c.variant("trainer.max_steps=2,", "trainer max_steps 2,")],
            "'trainer max_steps 2'",
        ),
    ),
    (
        "graft-grid",
        "optimizers as a list",
        lambda c: (
            [c.variant("optimizers:\n  sgd: {lr: 0.05, momentum: 0.5}", "optimizers: [sgd]")],
            "optimizers: ['sgd']",
        ),
    ),
    (
        "graft-table",
        "an optimizer's settings as a number",
        lambda c: (
            [c.variant("sgd: {lr: 0.05, momentum: 0.5}", "sgd: 0.05")],
            "optimizers.sgd: 0.05",
        ),
    ),
    (
        "graft-grid",
        "misspelt optimizer setting",
        lambda c: ([c.variant("lr: 0.05", "lrr: 0.05")], "'lrr'"),
    ),
    (
        "graft-table",
        "settings of an optimizer not in the grid",
        lambda c: (
            [c.variant("  sgd: {lr: 0.05, momentum: 0.5}", "  sgd: {lr: 0.05}\n  lamb: {lr: 1}")],
            "optimizers.lamb",
        ),
    ),
    ("graft-grid", "misspelt key", lambda c: ([c.variant("seeds:", "seed:")], "seed: unknown key")),
    (
        "graft-table",
        "magnitude as a scalar",
        lambda c: ([c.variant("magnitude: [adam]", "magnitude: adam")], "grid.magnitude: 'adam'"),
    ),
    (
        "graft-grid",
        "a direction twice",
        lambda c: (
            [c.variant("direction: [sgd, adam]", "direction: [sgd, sgd]")],
            "'sgd' is twice",
        ),
    ),
    (
        "graft-table",
        "unknown optimizer in the grid",
        lambda c: ([c.variant("magnitude: [adam]", "magnitude: [adamx]")], "'adamx'"),
    ),
    (
        "graft-grid",
        "metrics as a scalar",
        lambda c: (
            [c.variant("metrics: [eval/top1, eval/loss]", "metrics: eval/top1")],
            "metrics: 'eval/top1'",
        ),
    ),
    (
        "graft-table",
        "missing task",
        lambda c: ([c.variant("task: digits_resnet\n", "")], "task: missing"),
    ),
    (
        "graft-grid",
        "unknown task in the file",
        lambda c: ([c.variant("task: digits_resnet", "task: digits")], "'digits'"),
    ),
    (
        "graft-grid",
        "tune lr as a scalar",
        lambda c: ([c.experiment(CAT + "tune: {lr: {sgd: 0.1}}\n")], "tune.lr.sgd: 0.1"),
    ),
    (
        "graft-table",
        "tuning an optimizer not in the grid",
        lambda c: ([c.experiment(CAT + "tune: {lr: {lamb: [0.1, 0.3]}}\n")], "tune.lr.lamb"),
    ),
    (
        "graft-grid",
        "misspelt tune key",
        lambda c: (
            [c.experiment(CAT + "tune: {lr: {sgd: [0.1]}, metrics: eval/loss}\n")],
            "tune.metrics",
        ),
    ),
    (
        "graft-table",
        "reference of a cell not in the grid",
        lambda c: ([c.experiment(CAT + "reference: {'sgd#sgd': {eval/top1: 0.9}}\n")], "'sgd#sgd'"),
    ),
    (
        "graft-grid",
        "reference of a metric not shown",
        lambda c: (
            [c.experiment(CAT + "reference: {'adam#sgd': {eval/top5: 0.9}}\n")],
            "'eval/top5'",
        ),
    ),
    (
        "graft-table",
        "a name that is a path",
        lambda c: ([c.variant("name: cat", "name: ../cat")], "'../cat'"),
    ),
    (
        "graft-grid",
        "study window unquoted",
        lambda c: (
            [c.experiment(ONE_PAIR + "study: {kind: static, window: 10:20}\n")],
            "study.window: 620",
        ),
    ),
    (
        "graft-table",
        "unknown study kind",
        lambda c: ([c.experiment(CAT + "study: {kind: statik}\n")], "'statik'"),
    ),
    # --- a base an experiment extends, a tuning record it reads
    (
        "graft-grid",
        "extends a base that is not there",
        lambda c: ([c.variant("task: digits_resnet", "extends: base/none.yaml")], "base/none.yaml"),
    ),
    (
        "graft-table",
        "a mistake in the base names the base",
        lambda c: (
            c.file("base/b.yaml", "task: digits_resnet\nseeds: [0, -1]\n")
            and [c.variant("seeds: [0]\n", "extends: base/b.yaml\n")],
            "b.yaml: seeds[1]: -1",
        ),
    ),
    (
        "graft-grid",
        "a base that extends another",
        lambda c: (
            c.file("base/b.yaml", "extends: c.yaml\n")
            and [c.variant("seeds: [0]\n", "extends: base/b.yaml\n")],
            "b.yaml: extends: unknown key",
        ),
    ),
    (
        "graft-grid",
        "lr: tuned without a record",
        lambda c: ([c.variant("lr: 0.05", "lr: tuned")], "'tuned' needs tuned_from"),
    ),
    (
        "graft-table",
        "a record without tuning.md",
        lambda c: (
            [c.experiment(CAT.replace("lr: 0.05", "lr: tuned") + f"tuned_from: {c.tmp}\n")],
            "holds no tuning.md",
        ),
    ),
    (
        "graft-grid",
        "a record that tuned another optimizer",
        lambda c: (
            c.file("rec/tuning.md", "| adam | 0.001 | 0.1 | **chosen** |\n")
            and [c.experiment(CAT.replace("lr: 0.05", "lr: tuned") + f"tuned_from: {c.tmp}/rec\n")],
            "chose no learning rate for sgd (it chose: adam)",
        ),
    ),
    (
        "graft-table",
        "tuned in place of a momentum",
        lambda c: ([c.variant("momentum: 0.5", "momentum: tuned")], "optimizers.sgd.momentum"),
    ),
    (
        "graft-grid",
        "a record nothing takes from",
        lambda c: (
            [c.experiment(CAT + "tuned_from: results/digits_resnet8-tuned\n")],
            "gives learning rates to no optimizer",
        ),
    ),
    # --- output folders that cannot be written
    (
        "graft-grid",
        "runs folder under a file",
        lambda c: (
            c.outputs_in(c.root / "a_file") or ["cat.yaml"],
            "a_file is a file",
        ),
    ),
    (
        "graft-grid",
        "results holding more runs than the grid has",
        lambda c: (
            c.results_holding({"provenance.json": provenance(5)}) or ["cat.yaml"],
            "holds 5 finished runs",
        ),
    ),
    (
        "graft-grid",
        "untuned grid over tuned results",
        lambda c: (
            c.results_holding({"provenance.json": provenance(1, tuned=True)}) or ["cat.yaml"],
            "holds tuned results",
        ),
    ),
    # --- graft-table: no runs, fewer runs, the other kind
    (
        "graft-table",
        "no runs, committed results",
        lambda c: (
            c.results_holding({"table.md": "# fresh\n", "provenance.json": provenance(2)})
            or [c.experiment(CAT.replace("name: cat", "name: fresh"), "fresh")],
            "no runs of fresh",
        ),
    ),
    (
        "graft-table",
        "no runs even with --force",
        lambda c: (
            [c.experiment(CAT.replace("name: cat", "name: fresh"), "fresh"), "--force"],
            "no runs of fresh",
        ),
    ),
    ("graft-table", "--tuned without tuned runs", lambda c: (["cat.yaml", "--tuned"], "tuned/")),
    (
        "graft-table",
        "fewer runs than the results hold",
        lambda c: (
            c.results_holding({"table.md": "# cat\n", "provenance.json": provenance(3)})
            or ["cat.yaml"],
            "holds 3 finished runs, the new results 2 of 2",
        ),
    ),
    (
        "graft-table",
        "fewer runs than a table.csv counts",
        lambda c: (
            c.results_holding(
                {
                    "table.csv": "magnitude,direction,metric,mean,std,seeds,reference\n"
                    "adam,sgd,eval/top1,0.5,0.1,3,\nadam,sgd,eval/loss,0.5,0.1,3,\n"
                }
            )
            or ["cat.yaml"],
            "--force",
        ),
    ),
    (
        "graft-table",
        "results that cannot be counted",
        lambda c: (
            c.results_holding({"table.md": "# cat\n"}) or ["cat.yaml"],
            "no readable provenance.json or table.csv",
        ),
    ),
    (
        "graft-table",
        "untuned runs over tuned results",
        lambda c: (
            c.results_holding({"provenance.json": provenance(1, tuned=True)}) or ["cat.yaml"],
            "holds tuned results",
        ),
    ),
    (
        "graft-table",
        "results folder is a file",
        lambda c: (
            c.file("results/cat", "x") and c.results_in(c.tmp / "results") or ["cat.yaml"],
            "is a file",
        ),
    ),
    # --- graft-compare
    ("graft-compare", "nothing to compare", lambda c: ([], "runs")),
    ("graft-compare", "no such folder", lambda c: (["outputs/cat/adam#lamb"], "adam#lamb")),
    ("graft-compare", "a folder of no runs", lambda c: (["outputs"], "outputs has no summary")),
    (
        "graft-compare",
        "an earlier comparison",
        lambda c: (["outputs/cat/adam#adam", "--out", "cmp"], "cmp already holds"),
    ),
    (
        "graft-compare",
        "the default --out holds one",
        lambda c: (
            c.monkeypatch.chdir(c.tmp)
            or shutil.copytree(c.root / "cmp", c.tmp / "compare")
            and [str(c.root / "outputs/cat/adam#adam")],
            "compare already holds",
        ),
    ),
    (
        "graft-compare",
        "--out is a file",
        lambda c: (["outputs/cat/adam#adam", "--out", "a_file"], "a_file is a file"),
    ),
    (
        "graft-compare",
        "one cell twice",
        lambda c: (["outputs/cat/adam#adam", "outputs/cat/adam#adam"], "given twice"),
    ),
    (
        "graft-compare",
        "a torn summary.json",
        lambda c: (
            c.file("run/summary.json", "{") and [str(c.tmp / "run")],
            "summary.json is not a readable",
        ),
    ),
    ("graft-compare", "misspelt option", lambda c: (["outputs/cat", "--outt", "x"], "--outt")),
    # --- graft-static
    ("graft-static", "no subcommand", lambda c: ([], "command")),
    ("graft-static", "misspelt subcommand", lambda c: (["derivee", GRAFTED], "'derivee'")),
    ("graft-static", "not a run", lambda c: (["derive", "outputs/cat"], "outputs/cat")),
    (
        "graft-static",
        "a run that was not grafted",
        lambda c: (["derive", "outputs/cat/adam#adam/seed0"], "not grafted"),
    ),
    (
        "graft-static",
        "window not START:END",
        lambda c: (["derive", GRAFTED, "--window", "1-2"], "'1-2'"),
    ),
    (
        "graft-static",
        "window outside the run",
        lambda c: (["derive", GRAFTED, "--window", "100:200"], "100:200"),
    ),
    (
        "graft-static",
        "unknown reduction",
        lambda c: (["derive", GRAFTED, "--reduce", "max"], "'max'"),
    ),
    (
        "graft-static",
        "--out is a folder",
        lambda c: (["derive", GRAFTED, "--out", "outputs"], "outputs is a folder"),
    ),
    (
        "graft-static",
        "--out under a file",
        lambda c: (["derive", GRAFTED, "--out", "a_file/m.json"], "a_file/m.json"),
    ),
    (
        "graft-static",
        "--out holds other multipliers",
        lambda c: (
            c.file("m.json", '{"multipliers": {}}\n')
            and ["derive", GRAFTED, "--out", str(c.tmp / "m.json")],
            "already holds other multipliers",
        ),
    ),
]


@pytest.fixture
def context(grid, tmp_path, monkeypatch) -> Context:
    monkeypatch.chdir(grid)
    monkeypatch.setattr(publish, "RESULTS", grid / "results")
    monkeypatch.setattr(publish, "OUTPUTS", Path("outputs"))
    return Context(grid, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("program", "setup"), [(p, s) for p, _, s in CASES], ids=[f"{p} {n}" for p, n, _ in CASES]
)
def test_a_mistake_is_one_line_exit_2_and_changes_nothing(context, capsys, program, setup):
    arguments, bad = setup(context)
    assert_refused(
        PROGRAMS[program], [program, *arguments], bad, [context.root, context.tmp], capsys
    )


# Unwritable folders: root ignores modes, so these make the folder immutable (tests/refusals.py).


@pytest.mark.slow
def test_graft_table_into_a_read_only_results_root(context, capsys):
    with read_only(context.root / "results"):
        assert_refused(
            table.main, ["graft-table", "cat.yaml"], "cannot write in", [context.root], capsys
        )


@pytest.mark.slow
def test_graft_grid_into_a_read_only_results_root_refuses_before_running(context, capsys):
    with read_only(context.root / "results"):
        assert_refused(
            run.main, ["graft-grid", "cat.yaml"], "cannot write in", [context.root], capsys
        )


def test_graft_compare_into_a_read_only_folder(context, capsys):
    out = context.tmp / "locked"
    out.mkdir()
    with read_only(out):
        assert_refused(
            compare.main,
            ["graft-compare", "outputs/cat/adam#adam", "--out", str(out)],
            "cannot write in",
            [context.root, context.tmp],
            capsys,
        )


def test_graft_static_into_a_read_only_folder(context, capsys):
    out = context.tmp / "locked"
    out.mkdir()
    with read_only(out):
        assert_refused(
            static_cli.main,
            ["graft-static", "derive", GRAFTED, "--out", str(out / "m.json")],
            "cannot write",
            [context.root, context.tmp],
            capsys,
        )


def test_the_catalogue_is_large_and_every_case_distinct():
    names = [(program, name) for program, name, _ in CASES]
    assert len(set(names)) == len(names) and len(CASES) + 4 >= 35


# The other side of the refusals: what --force and a fresh folder allow.


@pytest.mark.slow
def test_graft_table_force_replaces_a_folder_of_more_runs(context, monkeypatch, capsys):
    context.results_holding({"table.md": "# cat\n", "provenance.json": provenance(3)})
    monkeypatch.setattr(sys, "argv", ["graft-table", "cat.yaml", "--force"])
    table.main()
    written = json.loads((context.tmp / "results/cat/provenance.json").read_text())
    assert len(written["runs"]) == 2 and written["tuned"] is False
    assert "| **adam** |" in capsys.readouterr().out
    assert sorted(path.name for path in (context.tmp / "results").iterdir()) == ["cat"]


@pytest.mark.slow
def test_graft_table_writes_the_same_count_again_without_force(context, monkeypatch):
    shutil.copytree(context.root / "results", context.tmp / "results")
    context.results_in(context.tmp / "results")
    monkeypatch.setattr(sys, "argv", ["graft-table", "cat.yaml"])
    table.main()
    assert (context.tmp / "results/cat/table.md").read_text() == (
        context.root / "results/cat/table.md"
    ).read_text()


@pytest.mark.slow
def test_graft_compare_force_replaces_an_earlier_comparison(context, monkeypatch):
    shutil.copytree(context.root / "cmp", context.tmp / "cmp")
    out = context.tmp / "cmp"
    monkeypatch.setattr(
        sys, "argv", ["graft-compare", "outputs/cat/adam#adam", "--out", str(out), "--force"]
    )
    compare.main()
    assert "| adam#adam | 1 |" in (out / "compare.md").read_text()
    assert sorted(path.name for path in out.iterdir()) == ["compare.md", "compare.png"]
