"""The studies graft-grid runs for an experiment with a `study:` block, on a few steps each:
static correction, tuning transfer, schedule trend; and the trend fit on known curves."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from graft.common.errors import EXIT_RUN_FAILED, UserError
from graft.common.run_dir import read_config
from graft.grid import publish
from graft.grid.experiment import load_experiment
from graft.grid.run import main as grid_main
from graft.grid.run import run_grid
from graft.grid.studies import recovery, transfer_verdict
from graft.grid.table import Failure, Runs
from graft.grid.verdict import of_seed_means
from graft.train.recorded import Recorded
from graft.transfer.trend import fit_trend

STUDY = """
name: {name}
description: A study of a few steps.
task: digits_resnet
grid: {{magnitude: [{m}], direction: [{d}]}}
seeds: [0]
optimizers:
  sgd: {{lr: 0.05, momentum: 0.9}}
overrides: [trainer.max_steps=4, trainer.batch_size=8, logger=none, trainer.progress=false,
            trainer.log_every=1, trainer.log_norms_every=1, trainer.eval_every=4]
metrics: [eval/loss, eval/top1]
study: {study}
"""


def run_study(folder: Path, name: str, study: str, m: str = "adam", d: str = "sgd") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, m=m, d=d, study=study))
    return run_grid(
        load_experiment(str(path)), [], outputs=folder / "outputs", results_root=folder / "results"
    ).folder


def summary(folder: Path, name: str, arm: str) -> dict:
    return json.loads((folder / f"outputs/{name}/{arm}/seed0/summary.json").read_text())


@pytest.mark.slow
def test_static_study_runs_its_arms_and_sgd_plus_static_keeps_sgd_state_alone(tmp_path):
    results = run_study(tmp_path, "st", "{kind: static, window: '2:4', scales: [1, 0.5]}")
    table = (results / "table.md").read_text()
    for arm in ("adam", "sgd", "adam#sgd", "sgd+static", "sgd+static-x0.5"):
        assert summary(tmp_path, "st", arm)["status"] == "finished"
        assert f"| {arm} |" in table
    derived = json.loads((results / "multipliers.json").read_text())
    assert derived["window"] == [2, 4] and derived["source"].endswith("adam#sgd/seed0")
    static = summary(tmp_path, "st", "sgd+static")
    assert (
        static["optimizer_state_bytes"] == summary(tmp_path, "st", "sgd")["optimizer_state_bytes"]
    )
    assert "| sgd+static |" in table and "| 0.50x |" in table.split("| sgd+static |")[1]
    assert (results / "multipliers.png").exists() and (results / "curves.png").exists()
    assert "steps 2..4" in table
    half = json.loads((results / "multipliers-x0.5.json").read_text())
    assert half["scale"] == 0.5 and "scale" not in derived
    assert half["multipliers"] == {k: v * 0.5 for k, v in derived["multipliers"].items()}
    trained = read_config(tmp_path / "outputs/st/sgd+static-x0.5/seed0")
    assert trained["static"].endswith("multipliers-x0.5.json")
    assert table.count("Recovery on eval/loss") + table.count("On eval/loss") == 2


@pytest.mark.slow
def test_tuning_transfer_study_reports_best_tuned_d_grafted_d_and_trials_saved(tmp_path):
    results = run_study(
        tmp_path, "tt", "{kind: tuning_transfer, lrs: [0.01, 0.1]}", m="sgd", d="adagrad"
    )
    table = (results / "table.md").read_text()
    for lr in (0.01, 0.1):
        assert summary(tmp_path, "tt", f"adagrad/lr{lr}")["optimizers"]["magnitude"]["lr"] == lr
    grafted = summary(tmp_path, "tt", "sgd#adagrad")
    assert grafted["optimizers"]["magnitude"]["lr"] == 0.05  # SGD's tuned lr, once
    assert table.count("**best**") == 1
    assert "Trials saved: 1 of 2 (1 runs over 1 seeds)" in table
    assert (results / "tuning.png").exists()


@pytest.mark.slow
def test_schedule_trend_study_fits_each_seed(tmp_path):
    results = run_study(tmp_path, "tr", "{kind: schedule_trend}", m="sgd", d="adagrad")
    table = (results / "table.md").read_text()
    assert "| seed0 |" in table and "linear R²" in table
    assert (results / "trend.png").exists()


def recorded(steps: np.ndarray, ratio: np.ndarray) -> Recorded:
    return Recorded(
        run_dir=Path("run"),
        steps=steps,
        ratios={"a": ratio, "b": ratio * 1.0, "c": ratio},
        config={"trainer": {"max_steps": int(steps[-1])}, "schedule": {"name": "constant"}},
    )


def test_the_trend_fit_recovers_a_line_and_a_power_law():
    steps = np.arange(10, 510, 10)
    line = fit_trend(recorded(steps, 0.5 + 0.01 * steps))
    assert line.slope == pytest.approx(0.01) and line.intercept == pytest.approx(0.5)
    assert line.linear_r2 == pytest.approx(1.0) and line.power_r2 < 1.0
    power = fit_trend(recorded(steps, 3.0 * steps**0.5))
    assert power.power == pytest.approx(0.5) and power.scale == pytest.approx(3.0)
    assert power.power_r2 == pytest.approx(1.0) and power.linear_r2 < 1.0


def test_the_trend_divides_out_the_runs_schedule():
    steps = np.arange(1, 101)
    # linear decay: the step logged at t used s(t - 1) = 1 - (t - 1)/100
    factors = 1 - (steps - 1) / 100
    trend = fit_trend(
        Recorded(
            run_dir=Path("run"),
            steps=steps,
            ratios={"a": 2.0 * steps * factors},
            config={"trainer": {"max_steps": 100}, "schedule": {"name": "linear"}},
        )
    )
    assert trend.slope == pytest.approx(2.0) and trend.linear_r2 == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("study", "grid", "message"),
    [
        ("{kind: sometimes}", "[adam]", "study.kind: 'sometimes' is unknown; allowed: static"),
        ("{kind: static, lrs: [1]}", "[adam]", "study.lrs: option 'lrs' does not apply to static"),
        ("{kind: tuning_transfer}", "[adam]", "study.lrs: .*needs lrs: \\[the direction's"),
        ("{kind: static}", "[adam, sgd]", "grid needs one magnitude and one direction"),
        ("{kind: static, window: 10:20}", "[adam]", "study.window: 620 is not 'START:END'"),
        ("{kind: static, reduce: max}", "[adam]", "study.reduce: 'max' is unknown"),
        ("{kind: static, scales: [0]}", "[adam]", "study.scales.*0.*a number > 0"),
        ("{kind: static, scales: [1, 1.0]}", "[adam]", "study.scales: .*without repeats"),
        ("{kind: tuning_transfer, lrs: [1], scales: [1]}", "[adam]", "does not apply to tun"),
    ],
)
def test_a_bad_study_block_is_named(tmp_path, study, grid, message):
    path = tmp_path / "bad.yaml"
    path.write_text(
        STUDY.format(name="bad", m="adam", d="sgd", study=study).replace("[adam]", grid)
    )
    with pytest.raises(UserError, match=message):
        load_experiment(str(path))


@pytest.mark.slow
def test_a_study_whose_grafted_run_fails_still_writes_its_table_and_exits_1(
    tmp_path, monkeypatch, capsys
):
    """sgd at lr 1e30 diverges, alone and as sgd#adam's magnitude: there are no multipliers to
    derive, so adam+static cannot run; the table says so, and graft-grid exits 1."""
    (tmp_path / "div.yaml").write_text(
        STUDY.format(name="div", m="sgd", d="adam", study="{kind: static}").replace(
            "lr: 0.05", "lr: 1.0e+30"
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(publish, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sys, "argv", ["graft-grid", "div.yaml"])
    with pytest.raises(SystemExit) as exit_info:
        grid_main()
    assert exit_info.value.code == EXIT_RUN_FAILED
    table = (tmp_path / "results/div/table.md").read_text()
    assert "No multipliers: the grafted run they derive from did not finish." in table
    assert "| adam+static | failed (seed 0) | failed (seed 0) |" in table
    failed = table.split("## Failed runs")[1]
    assert "- sgd#adam seed 0: non-finite training loss at step" in failed
    assert "- adam+static seed 0: not run: sgd#adam seed 0 did not finish" in failed
    assert "| adam | " in table and summary(tmp_path, "div", "adam")["status"] == "finished"
    assert "3 of 4 runs did not finish" in capsys.readouterr().err


def arm(*values: float) -> Runs:
    return Runs({"eval/loss": list(values)}, [], [], len(values))


NAMES = ("adam", "sgd", "sgd+static")  # M, D and D + static, as the static study names them


def test_recovery_names_the_share_closed_with_its_interval():
    text = recovery(
        "eval/loss",
        arm(1.0, 1.01, 0.99),
        arm(2.0, 2.02, 1.98),
        arm(1.5, 1.52, 1.48),
        *NAMES,
    )
    assert "sgd+static (1.5000) closes 50 % of the gap" in text
    low, high = (int(x) for x in re.search(r"interval \[(-?\d+) %, (-?\d+) %\]", text).groups())
    assert low < 50 < high and high - low < 10
    assert "significantly more than none and less than all" in text
    noisy = recovery(
        "eval/loss", arm(1.0, 1.5, 0.5), arm(2.0, 2.5, 1.5), arm(1.5, 2.3, 0.7), *NAMES
    )
    assert "the seeds cannot tell how much it closes" in noisy


def test_recovery_refuses_a_gap_the_seeds_do_not_show():
    text = recovery(
        "eval/loss",
        arm(1.0, 1.2, 0.8),
        arm(1.05, 1.25, 0.85),
        arm(1.0, 1.1, 0.9),
        *NAMES,
    )
    assert "are not separated" in text and "closes" not in text
    assert "not judged: adam has 0 failed seed(s) and 1 finished" in recovery(
        "eval/loss", arm(1.0), arm(2.0, 2.1), arm(1.5, 1.6), *NAMES
    )
    failed = Runs({"eval/loss": [1.5, 1.6]}, [Failure(2, "diverged", Path("x"))], [], 3)
    assert "not judged: sgd+static has 1 failed seed(s)" in recovery(
        "eval/loss", arm(1.0, 1.1), arm(2.0, 2.1), failed, *NAMES
    )


@pytest.mark.parametrize(
    ("grafted", "verdict"),
    [
        ((1.0, 1.02, 0.98), "no difference detected"),
        ((1.5, 1.52, 1.48), "sgd#adagrad is worse"),
        ((0.5, 0.52, 0.48), "sgd#adagrad is better"),
    ],
)
def test_the_transfer_verdict_reads_the_interval_of_the_difference(grafted, verdict):
    sweep = {0.01: arm(1.0, 1.03, 0.97), 0.1: arm(2.0, 2.1, 1.9), 0.001: arm(3.0, 3.1, 2.9)}
    text = transfer_verdict("eval/loss", sweep, 0.01, arm(*grafted), "adagrad", "sgd#adagrad")
    assert verdict in text and "Not bracketed" not in text


@pytest.mark.parametrize(("best", "side"), [(0.001, "smallest"), (0.1, "largest")])
def test_the_transfer_verdict_flags_a_best_at_an_end_of_the_sweep(best, side):
    sweep = {lr: arm(1.0, 1.1) for lr in (0.001, 0.01, 0.1)}
    text = transfer_verdict("eval/loss", sweep, best, arm(1.0, 1.1), "adagrad", "sgd#adagrad")
    assert f"Not bracketed: adagrad's best is the {side} lr of the sweep" in text


def test_a_statistic_of_seed_means_has_a_bootstrap_interval_that_regenerates():
    x, y = [1.0, 1.2, 0.9, 1.1], [2.0, 2.1, 1.9, 2.2]
    first = of_seed_means(lambda a, b: a - b, [x, y])
    assert first == of_seed_means(lambda a, b: a - b, [x, y])  # a fixed generator
    assert first.value == pytest.approx(np.mean(x) - np.mean(y))
    assert first.low < first.value < first.high < 0
    with pytest.raises(ValueError, match="2 or more finite values"):
        of_seed_means(lambda a: a, [[1.0]])
