"""One rule between the `optimizers` table and `magnitude.*` / `direction.*`: a hyperparameter
is set in one of them. Both for the same optimizer and key is one line naming both, exit 2,
nothing written: in either order, in a sweep, through graft-train and graft-grid. Different
keys combine (graft/train/optimizer.py, refuse_two_sources)."""

from __future__ import annotations

import pytest

from graft.common.errors import UserError
from graft.grid import run
from graft.grid.experiment import load_experiment
from graft.train import cli
from graft.train.cli import compose_run
from graft.train.optimizer import optimizer_specs, refuse_two_sources
from graft.train.strict import check_config
from tests.refusals import assert_refused

TINY = ["logger=none", "trainer.batch_size=16", "trainer.max_steps=2", "trainer.progress=false"]

# (overrides on top of the default adam#sgd cell, what the one line names)
BOTH = [
    (["magnitude.lr=0.5", "+optimizers.adam.lr=0.1"], "magnitude.lr=0.5 and optimizers.adam.lr"),
    (["+optimizers.adam.lr=0.1", "magnitude.lr=0.5"], "magnitude.lr=0.5 and optimizers.adam.lr"),
    (
        ["direction.momentum=0.5", "+optimizers.sgd.momentum=0.9"],
        "direction.momentum=0.5 and optimizers.sgd.momentum",
    ),
    (  # M#M: the table sets adam wherever it runs, D included
        ["optim@direction=adam", "++direction.eps=1e-6", "+optimizers.adam.eps=1e-7"],
        "++direction.eps=1e-6 and optimizers.adam.eps",
    ),
    (  # a sweep is refused on the job that holds both, before any job starts
        ["-m", "magnitude.lr=0.1,0.2", "+optimizers.adam.lr=0.3"],
        "magnitude.lr=0.1 and optimizers.adam.lr",
    ),
    (
        ["-m", "optim@magnitude=adam,sgd", "+optimizers.sgd.lr=0.3", "magnitude.lr=0.2"],
        "magnitude.lr=0.2 and optimizers.sgd.lr",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "bad"), BOTH)
def test_graft_train_refuses_a_role_override_and_the_table_setting_one_key(
    overrides, bad, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    line = assert_refused(cli.main, ["graft-train", *TINY, *overrides], bad, [tmp_path], capsys)
    assert "set it once" in line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_role_override_and_the_table_of_different_keys_both_apply():
    overrides = ["optim@magnitude=sgd", "graft=off", "magnitude.momentum=0.5"]
    overrides.append("+optimizers.sgd.lr=0.3")
    config, _ = compose_run(overrides)
    check_config(overrides, config, sweeping=False)
    magnitude, _ = optimizer_specs(config)
    assert (magnitude["lr"], magnitude["momentum"]) == (0.3, 0.5)


def test_without_grafting_the_direction_takes_no_role():
    """graft=off runs M alone: direction.* and a table entry of D's name do not meet."""
    refuse_two_sources(
        ["direction.lr=0.5"], {"sgd": {"lr": 0.1}}, {"magnitude": ["adam"], "direction": []}
    )


GRID = """\
name: prec
task: digits_resnet
grid: {magnitude: [adam], direction: [sgd, adam]}
seeds: [0]
optimizers:
  sgd: {lr: 0.05, momentum: 0.5}
overrides: [trainer.max_steps=2, logger=none]
metrics: [eval/loss]
"""


@pytest.mark.parametrize(
    ("text", "arguments", "bad"),
    [
        (GRID, ["direction.lr=0.5"], "direction.lr=0.5 and optimizers.sgd.lr (/"),
        (GRID, ["++direction.momentum=0.9"], "++direction.momentum=0.9 and optimizers.sgd"),
        (  # the experiment's own overrides are held to the same rule
            GRID.replace("logger=none]", "logger=none, direction.momentum=0.9]"),
            [],
            "direction.momentum=0.9 and optimizers.sgd.momentum",
        ),
        (  # a study runs D alone too, in M's place
            GRID.replace("direction: [sgd, adam]", "direction: [sgd]") + "study: {kind: static}\n",
            ["magnitude.lr=0.5"],
            "magnitude.lr=0.5 and optimizers.sgd.lr",
        ),
        (  # --tune gives every tuned optimizer an lr in the table
            GRID + "tune: {lr: {adam: [0.001, 0.003]}}\n",
            ["magnitude.lr=0.5", "--tune"],
            "magnitude.lr=0.5 and optimizers.adam.lr",
        ),
    ],
    ids=["direction", "force-add", "in the file", "study", "tune"],
)
def test_graft_grid_refuses_a_role_override_the_table_also_sets(
    text, arguments, bad, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "prec.yaml"
    path.write_text(text)
    assert_refused(run.main, ["graft-grid", str(path), *arguments], bad, [tmp_path], capsys)


def test_a_grid_role_override_of_a_key_no_table_entry_sets_passes(tmp_path):
    path = tmp_path / "prec.yaml"
    path.write_text(GRID)
    experiment = load_experiment(str(path))
    table, roles = run.table_of(experiment, False), run.roles_of(experiment, False)
    refuse_two_sources(["magnitude.lr=0.5", "direction.weight_decay=0.1"], table, roles)
    with pytest.raises(UserError, match="direction.lr=0.5 and optimizers.sgd.lr"):
        refuse_two_sources(["direction.lr=0.5"], table, roles)
