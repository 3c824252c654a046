"""graft-static and the trainer's static and replay options: the derivation on known ratios,
replay retracing a grafted run, SGD + static with SGD's state alone, and the bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from graft.common.errors import UserError
from graft.tasks import build_task
from graft.train.multipliers import load_multipliers
from graft.train.optimizer import build_optimizer
from graft.train.recorded import Recorded, load_recorded
from graft.transfer.static import (
    default_window,
    derive,
    parse_window,
    scaled,
    write_multipliers,
)
from tests.runs import config, metric_lines, train_in_process

# adam#sgd with every step's norms logged, fp64 so that a replay can match it to 1e-10.
SOURCE = [
    "trainer.max_steps=12",
    "trainer.log_norms_every=1",
    "trainer.dtype=float64",
    "schedule=cosine",
    "schedule.warmup_steps=3",
    "direction.lr=0.05",
]


@pytest.fixture(scope="module")
def source(module_tmp) -> Path:
    run_dir = module_tmp / "adam#sgd"
    assert train_in_process(run_dir, *SOURCE) == 0
    return run_dir


def synthetic(steps: list[int], ratios: dict[str, list[float]], **schedule) -> Recorded:
    return Recorded(
        run_dir=Path("run"),
        steps=np.array(steps),
        ratios={name: np.array(values) for name, values in ratios.items()},
        config={
            "trainer": {"max_steps": steps[-1]},
            "schedule": {"name": "constant", "warmup_steps": 0, **schedule},
            "magnitude": {"name": "adam", "lr": 1e-3},
            "direction": {"name": "sgd", "lr": 0.1},
            "optimizers": {"sgd": {"lr": 0.2}},
        },
    )


def test_multipliers_are_the_reduced_schedule_free_ratios_over_the_window():
    # Linear schedule over 10 steps: the step logged at t used s(t - 1) = 1 - (t - 1)/10.
    steps = list(range(1, 11))
    factors = [1 - (t - 1) / 10 for t in steps]
    ratios = {
        "w": [3.0 * f for f in factors],
        "b": [f * (t % 3 + 1) for t, f in zip(steps, factors)],
    }
    recorded = synthetic(steps, ratios, name="linear", final_ratio=0.0)
    content = derive(recorded, (4, 10), "median")
    assert content["multipliers"]["w"] == pytest.approx(3.0)
    assert content["multipliers"]["b"] == pytest.approx(np.median([t % 3 + 1 for t in steps[3:]]))
    assert content["steps_used"] == 7 and content["window"] == [4, 10]
    assert content["direction_lr"] == 0.2  # the experiment's optimizers table wins
    mean = derive(recorded, (4, 10), "mean")["multipliers"]["b"]
    assert mean == pytest.approx(np.mean([t % 3 + 1 for t in steps[3:]]))


def test_the_default_window_starts_after_the_warmup_or_the_first_tenth():
    steps = list(range(10, 201, 10))
    ratios = {"w": [1.0] * len(steps)}
    assert default_window(synthetic(steps, ratios, warmup_steps=50)) == (51, 200)
    assert default_window(synthetic(steps, ratios)) == (21, 200)
    assert parse_window("30:", synthetic(steps, ratios)) == (30, 200)
    assert parse_window(":90", synthetic(steps, ratios)) == (10, 90)


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ("500:900", "--window 500:900 is outside the run's logged steps 10..200"),
        ("12:18", "--window 12:18 holds none of the run's logged steps 10..200; widen it"),
        ("a:b", "--window 'a:b' is not START:END in steps"),
    ],
)
def test_a_bad_window_is_named(window, message):
    recorded = synthetic(list(range(10, 201, 10)), {"w": [1.0] * 20})
    with pytest.raises(UserError, match=message):
        parse_window(window, recorded)


def test_a_zero_direction_norm_throughout_gets_multiplier_one():
    content = derive(synthetic([1, 2, 3], {"w": [2.0, 2.0, 2.0], "frozen": [np.nan] * 3}), (1, 3))
    assert content["multipliers"]["frozen"] == 1.0 and content["no_ratio"] == ["frozen"]


def test_scaled_multipliers_record_their_factor_and_one_is_the_file_unchanged():
    content = derive(synthetic([1, 2, 3], {"w": [2.0, 2.0, 2.0], "b": [4.0] * 3}), (1, 3))
    assert scaled(content, 1) == content
    half = scaled(content, 0.5)
    assert half["scale"] == 0.5 and half["multipliers"] == {"w": 1.0, "b": 2.0}
    assert content["multipliers"] == {"w": 2.0, "b": 4.0}  # the derived content is kept
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match="--scale .*allowed: a finite number > 0"):
            scaled(content, bad)


@pytest.mark.slow
def test_replay_retraces_the_grafted_run(source, tmp_path):
    """Plain SGD at lr_D with each tensor's recorded ‖u_M‖/‖u_D‖ as its schedule takes the
    grafted adam#sgd steps: the same losses to fp64 rounding, step for step."""
    replay = tmp_path / "replay"
    code = train_in_process(
        replay,
        *SOURCE[:3],
        "optim@magnitude=sgd",
        "graft=off",
        "schedule=replay",
        f"schedule.run='{source}'",
        "magnitude.lr=0.05",
    )
    assert code == 0
    grafted = [line["train/loss"] for line in metric_lines(source) if "train/loss" in line]
    replayed = [line["train/loss"] for line in metric_lines(replay) if "train/loss" in line]
    assert len(replayed) == 12
    np.testing.assert_allclose(replayed, grafted, rtol=1e-10)
    summary = json.loads((replay / "summary.json").read_text())
    assert summary["cell"] == "sgd+replay" and not summary["grafting"]


@pytest.mark.slow
def test_sgd_with_static_multipliers_has_per_tensor_lrs_and_sgd_state_alone(source, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "graft.transfer.cli", "derive", str(source)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    path = source / "multipliers.json"
    content = json.loads(path.read_text())
    assert content["window"] == [4, 12]  # after the 3 warmup steps
    assert "plus: graft=off static=" in result.stdout

    cfg = config("optim@magnitude=sgd", "graft=off", f"static='{path}'", "magnitude.lr=0.05")
    model = build_task(cfg["task"], seed=0, cache_dir=tmp_path).model
    optimizer = build_optimizer(model, cfg)
    for group in optimizer.param_groups:
        (name,) = group["param_names"]
        assert group["lr"] == pytest.approx(0.05 * content["multipliers"][name])

    run_dir = tmp_path / "static"
    assert train_in_process(run_dir, "optim@magnitude=sgd", "graft=off", f"static='{path}'") == 0
    static = json.loads((run_dir / "summary.json").read_text())
    grafted = json.loads((source / "summary.json").read_text())
    numel = sum(p.numel() for p in model.parameters())
    assert static["cell"] == "sgd+static"
    assert static["optimizer_state_bytes"] == 4 * numel  # SGD's momentum, fp32
    tensors = len(list(model.parameters()))
    # fp64 Adam's two moments and a step count per tensor, and SGD's momentum: ~6x the bytes.
    assert grafted["optimizer_state_bytes"] == 8 * 3 * numel + 4 * tensors


@pytest.mark.slow
def test_static_or_replay_with_grafting_on_is_refused(source):
    recorded = load_recorded(source)
    multipliers = source / "static.json"  # its own file: any test may run alone
    write_multipliers(multipliers, derive(recorded, default_window(recorded), "median"))
    cfg = config(f"static='{multipliers}'")  # adam#sgd, the default
    model = build_task(cfg["task"], seed=0, cache_dir=Path(".")).model
    with pytest.raises(UserError, match="this run grafts adam#sgd; add graft=off"):
        build_optimizer(model, cfg)


def test_multipliers_for_another_model_list_the_first_mismatches(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"multipliers": {"conv1.weight": 1.0, "head.weight": 2.0}}))
    with pytest.raises(
        UserError,
        match=r"missing: fc.weight, fc.bias; not in the model: head.weight\); derive it",
    ):
        load_multipliers(path, ["conv1.weight", "fc.weight", "fc.bias"])
    with pytest.raises(UserError, match="no such file"):
        load_multipliers(tmp_path / "none.json", ["w"])
    path.write_text(json.dumps({"multipliers": {"w": -1.0}}))
    with pytest.raises(UserError, match="multiplier -1.0 for w; allowed: a finite number > 0"):
        load_multipliers(path, ["w"])


@pytest.mark.slow
def test_a_run_without_norms_or_without_grafting_says_what_to_set(tmp_path):
    run_dir = tmp_path / "plain"
    assert train_in_process(run_dir, "graft=off", "trainer.max_steps=2") == 0
    with pytest.raises(UserError, match="it was not grafted \\(adam alone\\)"):
        load_recorded(run_dir)
    quiet = tmp_path / "quiet"
    assert train_in_process(quiet, "trainer.max_steps=2", "trainer.log_norms_every=0") == 0
    with pytest.raises(UserError, match="train it with trainer.log_norms_every=N"):
        load_recorded(quiet)


@pytest.mark.slow
def test_replay_longer_than_the_recorded_run_is_refused(source, tmp_path):
    code = subprocess.run(
        [
            sys.executable,
            "-m",
            "graft.train",
            "logger=none",
            "graft=off",
            "schedule=replay",
            f"schedule.run={source}",  # graft-train quotes path values itself
            "trainer.max_steps=50",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
    )
    assert code.returncode == 2
    assert "recorded steps up to 12, fewer than trainer.max_steps=50" in code.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_graft_static_bad_input_is_one_line_and_exit_code_2(source, tmp_path):
    (tmp_path / "taken.json").write_text("{}")
    for args, message in [
        ([str(tmp_path)], "is not a graft-train run directory"),
        ([str(source), "--window", "40:60"], "outside the run's logged steps 1..12"),
        ([str(source), "--out", str(tmp_path / "taken.json")], "already holds other multipliers"),
        ([str(source), "--scale", "0"], "--scale 0.0; allowed: a finite number > 0"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "graft.transfer.cli", "derive", *args],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "taken.json").read_text() == "{}"
    assert OmegaConf.load(source / ".hydra/config.yaml").trainer.max_steps == 12


@pytest.mark.slow
def test_a_globally_grafted_run_yields_the_one_ratio_it_applied(tmp_path):
    run_dir = tmp_path / "global"
    assert (
        train_in_process(
            run_dir, "graft=global", "trainer.max_steps=2", "trainer.log_norms_every=1"
        )
        == 0
    )
    recorded = load_recorded(run_dir)
    line = metric_lines(run_dir)[0]
    names = [
        key.removeprefix("norms/direction/") for key in line if key.startswith("norms/direction/")
    ]
    total_m = sum(line[f"norms/magnitude/{n}"] ** 2 for n in names) ** 0.5
    total_d = sum(line[f"norms/direction/{n}"] ** 2 for n in names) ** 0.5
    for ratios in recorded.ratios.values():
        assert ratios[0] == pytest.approx(total_m / total_d, rel=1e-12)


def test_a_tensor_missing_from_a_norms_line_is_nan_there_not_misaligned(tmp_path):
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(
        OmegaConf.create(
            {
                "graft": {"granularity": "tensor"},
                "magnitude": {"name": "adam"},
                "direction": {"name": "sgd"},
            }
        ),
        tmp_path / ".hydra/config.yaml",
    )
    lines = [
        {"step": 1, "norms/magnitude/a": 2.0, "norms/direction/a": 1.0},
        {
            "step": 2,
            "norms/magnitude/a": 4.0,
            "norms/direction/a": 1.0,
            "norms/magnitude/b": 3.0,
            "norms/direction/b": 1.0,
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    recorded = load_recorded(tmp_path)
    assert list(recorded.ratios["a"]) == [2.0, 4.0]
    assert np.isnan(recorded.ratios["b"][0]) and recorded.ratios["b"][1] == 3.0


def test_replay_applies_the_recorded_schedule_exactly_between_logged_steps():
    """Norms every 4 steps of a 10-step warmup: the replayed lr at step 1 is the warmup's
    1/10 times the interpolated schedule-free ratio, not the ratio logged at step 4."""
    from graft.train.replay import ratio_at

    steps = np.array([4, 8, 12])
    free = np.array([2.0, 2.0, 3.0])
    warmup = lambda step: min(1.0, (step + 1) / 10)  # noqa: E731
    assert ratio_at(0, steps, free, warmup) == pytest.approx(2.0 * 0.1)
    assert ratio_at(9, steps, free, warmup) == pytest.approx(2.5 * 1.0)


@pytest.mark.slow
def test_static_and_replay_together_are_refused(source):
    cfg = config(
        "optim@magnitude=sgd",
        "graft=off",
        f"static='{source / 'multipliers.json'}'",
        "schedule=replay",
        f"schedule.run='{source}'",
    )
    model = build_task(cfg["task"], seed=0, cache_dir=Path(".")).model
    with pytest.raises(UserError, match="would apply the correction twice"):
        build_optimizer(model, cfg)
