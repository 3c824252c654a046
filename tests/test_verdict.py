"""The verdict rule (graft/grid/verdict.py) and how graft-table writes it (graft/grid/table.py):
each verdict on synthetic seeds, cells that are not judged, determinism, the curve distance,
log or identity by metric name, and the diagonals' 2·SE check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from graft.grid import table
from graft.grid.experiment import Experiment, load_experiment
from graft.grid.table import (
    Cell,
    Failure,
    curve_verdicts,
    diagonal_lines,
    final_verdicts,
    gather,
    markdown,
)
from graft.grid.verdict import (
    DIRECTION,
    FAR,
    MAGNITUDE,
    NOT_SEPARATED,
    UNCLEAR,
    difference,
    distance,
    judge,
    log_scale,
    on_shared_steps,
    scale,
)
from tests.refusals import assert_refused

NOISE = np.array([0.0, 0.01, -0.01, 0.02, -0.02])  # five seeds' offsets, mean 0


def seeds(centre: float, noise: np.ndarray = NOISE) -> np.ndarray:
    """Five seeds of a final metric: shape (seeds, 1)."""
    return (centre + noise)[:, None]


MM, DD = seeds(1.0), seeds(2.0)


def test_closer_to_the_magnitudes_diagonal():
    judgement = judge(seeds(1.1), MM, DD, resamples=2000)
    assert judgement.verdict == MAGNITUDE
    # a, b, g and Δ on the seeds as they are: the noise has mean 0 in every cell.
    assert (judgement.to_magnitude, judgement.to_direction, judgement.gap) == pytest.approx(
        (0.1, 0.9, 1.0)
    )
    assert judgement.delta.value == pytest.approx(0.8)
    assert judgement.delta.low > 0.7 and judgement.delta.high < 0.9
    assert judgement.separation.value == pytest.approx(-1.0)
    assert judgement.far.value == pytest.approx(0.1 - 0.5)


def test_closer_to_the_directions_diagonal():
    judgement = judge(seeds(1.85), MM, DD, resamples=2000)
    assert judgement.verdict == DIRECTION
    assert judgement.delta.value == pytest.approx(0.15 - 0.85)
    assert judgement.delta.high < 0


def test_far_from_both_when_further_from_the_nearer_diagonal_than_half_their_gap():
    judgement = judge(seeds(3.0), MM, DD, resamples=2000)
    assert judgement.verdict == FAR
    assert judgement.far.value == pytest.approx(1.0 - 0.5) and judgement.far.low > 0
    # Δ alone would have said "closer to D#D": far from both is checked first.
    assert judgement.delta.high < 0
    below = judge(seeds(-0.1), MM, DD, resamples=2000)  # beyond M#M, 1.1 from the gap
    assert below.verdict == FAR and below.far.value == pytest.approx(1.1 - 1.5 + 1.0)


def test_diagonals_that_are_not_separated_tell_nothing():
    close = seeds(1.0, np.array([0.3, -0.2, 0.1, -0.3, 0.1]))
    judgement = judge(seeds(1.02), MM, close, resamples=2000)
    assert judgement.verdict == NOT_SEPARATED
    assert judgement.separation.low <= 0 <= judgement.separation.high
    # The separation comes first: even a cell that sits on M#M is not called closer to it.
    assert judge(MM, MM, close, resamples=2000).verdict == NOT_SEPARATED


def test_big_seed_noise_on_the_grafted_cell_is_cant_tell():
    noisy = seeds(1.3, np.array([-0.9, 0.8, -0.5, 0.7, -0.1]))
    judgement = judge(noisy, MM, DD, resamples=2000)
    assert judgement.verdict == UNCLEAR
    assert judgement.delta.low < 0 < judgement.delta.high
    assert judgement.far.low <= 0
    # The same centre without the noise is closer to M#M.
    assert judge(seeds(1.3), MM, DD, resamples=2000).verdict == MAGNITUDE


def test_identical_seeds_give_intervals_of_one_point():
    judgement = judge(seeds(1.1, np.zeros(3)), seeds(1.0, np.zeros(2)), seeds(2.0, np.zeros(4)))
    assert judgement.delta.low == judgement.delta.high == pytest.approx(0.8)
    assert judgement.separation.low == judgement.separation.high == pytest.approx(-1.0)


def test_the_bootstrap_is_deterministic_and_follows_its_seed():
    noisy = seeds(1.3, np.array([-0.9, 0.8, -0.5, 0.7, -0.1]))
    first, again = judge(noisy, MM, DD), judge(noisy, MM, DD)
    assert first == again
    other = judge(noisy, MM, DD, seed=1)
    assert other.delta.value == first.delta.value and other.delta.low != first.delta.low


def test_judge_refuses_cells_it_cannot_judge():
    with pytest.raises(ValueError, match="seeds >= 2"):
        judge(seeds(1.0)[:1], MM, DD)
    with pytest.raises(ValueError, match="finite"):
        judge(np.array([[1.0], [math.nan]]), MM, DD)


def test_the_curve_distance_on_a_hand_computed_example():
    # Loss curves: seeds' log values average per step, on the steps every seed logged.
    e = math.e
    md = [([0, 10, 20, 30], [e**1, e**2, e**3, 9.0]), ([0, 10, 20], [e**3, e**2, e**1])]
    mm = [([0, 10, 20], [e**0, e**1, e**4]), ([0, 10, 20], [e**2, e**3, e**4])]
    dd = [([0, 10, 20, 30], [e**2, e**2, e**2, 1.0]), ([0, 10, 20], [e**2, e**2, e**2])]
    steps, arrays = on_shared_steps([md, mm, dd])
    assert steps == [0, 10, 20]  # step 30: only two seeds logged it
    md_log, mm_log, dd_log = (scale("train/loss", values).mean(axis=0) for values in arrays)
    np.testing.assert_allclose(md_log, [2, 2, 2])
    np.testing.assert_allclose(mm_log, [1, 2, 4])
    # |2 − 1|, |2 − 2|, |2 − 4| -> mean 1; to D#D (log 2 everywhere) 0.
    assert distance(md_log, mm_log) == pytest.approx(1.0)
    assert distance(md_log, dd_log) == pytest.approx(0.0)
    judgement = judge(*(scale("train/loss", values) for values in arrays), resamples=500)
    assert judgement.to_magnitude == pytest.approx(1.0)
    assert judgement.gap == pytest.approx((1 + 0 + 2) / 3)
    assert judgement.separation.value == pytest.approx((-1 + 0 + 2) / 3)


def test_losses_and_perplexities_are_compared_on_a_log_scale_other_metrics_as_they_are():
    assert log_scale("train/loss") and log_scale("eval/loss") and log_scale("eval/perplexity")
    assert not log_scale("eval/top1") and not log_scale("eval/accuracy")
    np.testing.assert_allclose(scale("train/loss", [1.0, math.e, math.e**2]), [0, 1, 2])
    np.testing.assert_allclose(scale("eval/perplexity", [10.0]), [math.log(10)])
    np.testing.assert_array_equal(scale("eval/top1", [0.5, 0.9]), [0.5, 0.9])
    assert not np.isfinite(scale("train/loss", [0.0])).any()  # no log: not judged


def test_the_diagonals_two_standard_error_check_on_a_hand_computed_example():
    # [4, 6]: mean 5, std √2, se 1; [0, 2]: mean 1, se 1; SE of the difference √2.
    found = difference([4.0, 6.0], [0.0, 2.0])
    assert found.difference == pytest.approx(4.0)
    assert found.standard_error == pytest.approx(math.sqrt(2))
    assert found.separated  # 4 > 2·√2
    assert not difference([2.0, 4.0], [0.0, 2.0]).separated  # 2 < 2·√2
    assert not difference([1.0, 3.0], [0.0, 0.0]).separated  # exactly 2·SE: not more
    cells = [
        cell("a", "a", 4.0, 6.0),
        cell("a", "b", 1.0, 1.0),
        cell("b", "a", 1.0, 1.0),
        cell("b", "b", 0.0, 2.0),
    ]
    assert diagonal_lines(cells, "loss") == [
        "Diagonals on loss (difference of means, SE = √(se₁² + se₂²); separated when "
        "|difference| > 2·SE): 1 of 1 pairs separated",
        "- a#a − b#b: +4.0000 (SE 1.4142): separated",
    ]


def cell(m: str, d: str, *values: float, failed: tuple[int, ...] = ()) -> Cell:
    """A cell with finished seeds holding `values` of "loss", and failed seeds."""
    failures = [Failure(seed, "diverged", Path(f"{m}#{d}/seed{seed}")) for seed in failed]
    runs = [Path(f"{m}#{d}/seed{index}") for index in range(len(values))]
    return Cell({"loss": list(values)}, failures, runs, len(runs) + len(failed), m, d)


FIVE = NOISE + 0.0
GRID = [
    cell("a", "a", *(1.0 + FIVE)),
    cell("a", "b", *(1.1 + FIVE)),  # 0.1 from a#a, 0.9 from b#b: the magnitude's
    cell("b", "a", *(1.2 + FIVE)),  # 0.8 from b#b, 0.2 from a#a: the direction's
    cell("b", "b", *(2.0 + FIVE)),
]


def test_each_off_diagonal_cell_gets_a_line_and_the_tally_counts_them():
    lines = final_verdicts(GRID, "loss", resamples=1000)
    assert lines[0].startswith("- a#b: 1.1000 (to a#a 0.1000, to b#b 0.9000); Δ = +0.8000 [")
    assert lines[0].endswith("]: closer to M#M")
    assert lines[1].startswith("- b#a: 1.2000 (to b#b 0.8000, to a#a 0.2000); Δ = -0.6000 [")
    assert lines[1].endswith("]: closer to D#D")
    assert lines[2] == (
        "\nOn loss: closer to M#M 1 of 2, closer to D#D 1 of 2, far from both 0 of 2, "
        "can't tell 0 of 2, not judged 0 of 2."
    )


def test_a_cell_with_a_failed_or_missing_seed_or_one_seed_is_not_judged():
    failed = [GRID[0], GRID[1], GRID[2], cell("b", "b", *(2.0 + FIVE[:4]), failed=(4,))]
    lines = final_verdicts(failed, "loss", resamples=1000)
    # b#b is the diagonal of both: neither is judged, and neither counts for or against.
    assert lines[:2] == [
        "- a#b: not judged: b#b has 1 of 5 seeds failed/missing",
        "- b#a: not judged: b#b has 1 of 5 seeds failed/missing",
    ]
    assert lines[2].endswith("can't tell 0 of 2, not judged 2 of 2.")
    assert "closer to M#M 0 of 2, closer to D#D 0 of 2" in lines[2]
    # A finished seed without the metric in its summary is missing too.
    missing = cell("a", "b", 1.1, 1.1, 1.1)
    missing.run_dirs.append(Path("a#b/seed3"))
    lines = final_verdicts([GRID[0], missing, GRID[2], GRID[3]], "loss", resamples=1000)
    assert lines[0] == "- a#b: not judged: a#b has 1 of 4 seeds failed/missing"
    assert lines[1].startswith("- b#a: 1.2000")  # b#a and its diagonals are whole
    one = [cell("a", "a", 1.0), GRID[1], GRID[2], GRID[3]]
    assert final_verdicts(one, "loss", resamples=1000)[0] == (
        "- a#b: not judged: a#a has 1 seed; the rule needs 2 or more"
    )
    no_diagonal = [GRID[0], GRID[1]]  # a grid of rows [a], columns [a, b]
    assert final_verdicts(no_diagonal, "loss", resamples=1000)[0] == (
        "- a#b: not judged: b#b is not in the grid"
    )


def test_the_verdict_lines_are_the_same_for_the_same_runs():
    noisy = [GRID[0], cell("a", "b", 1.3, 0.4, 2.1, 1.8, 0.9), GRID[2], GRID[3]]
    first = final_verdicts(noisy, "loss")
    assert first == final_verdicts(noisy, "loss")
    # Each cell has its own generator: a cell's line does not depend on its neighbours.
    assert final_verdicts(noisy[:2] + noisy[3:], "loss")[0] == first[0]


def write_run(run_dir: Path, final: float, curve: list[float]) -> None:
    """A finished run as graft-train leaves it: summary.json, and metrics.jsonl with
    train/loss every 10 steps."""
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "eval/loss": final}))
    lines = [{"step": 10 * (i + 1), "train/loss": loss} for i, loss in enumerate(curve)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_table_judges_final_metrics_and_curves_from_run_folders(tmp_path):
    # a#b trains like a#a (loss halving each log), b#a like a#a too; b#b stays high.
    curves = {"a#a": 1.0, "a#b": 1.05, "b#a": 1.1, "b#b": 4.0}
    for name, start in curves.items():
        for seed, wobble in enumerate((1.0, 1.01, 0.99)):
            run = tmp_path / name / f"seed{seed}"
            write_run(run, start * wobble, [start * wobble / 2**k for k in range(4)])
    (tmp_path / "b#a/seed2/metrics.jsonl").write_text(
        "\n".join(
            (tmp_path / "b#a/seed2/metrics.jsonl").read_text().splitlines()[:3]  # no step 40
        )
        + "\n"
    )
    experiment = Experiment(
        name="fake",
        description="A fake 2x2 grid.",
        task="digits_resnet",
        magnitudes=["a", "b"],
        directions=["a", "b"],
        seeds=[0, 1, 2],
        metrics=["eval/loss"],
        verdict={"resamples": 500},
    )
    cells = gather(experiment, tmp_path)
    text = markdown(experiment, cells)
    assert "## eval/loss (mean ± s.e.m. over the finished seeds of [0, 1, 2], n = 3" in text
    sem = 0.01 / math.sqrt(3)  # the seeds are start × (1, 1.01, 0.99)
    assert f"| **a** | 1.0000 ± {sem:.4f} | 1.0500 ± {1.05 * sem:.4f} |" in text
    assert "- a#a − b#b: -3.0000 (SE " in text and "1 of 1 pairs separated" in text
    assert "(500 resamples)" in text
    curve = text.split("## The train/loss curve")[1]
    # log(1.05) from a#a at every step, log(4/1.05) from b#b; b#a over the 3 shared steps.
    assert (
        f"- a#b: curve distance to a#a {math.log(1.05):.4f}, to b#b {math.log(4 / 1.05):.4f}"
        in (curve)
    )
    assert "(over 4 steps)" in curve and "(over 3 steps)" in curve
    assert "On the train/loss curve: closer to M#M 1 of 2, closer to D#D 1 of 2," in curve
    assert text == markdown(experiment, gather(experiment, tmp_path))  # the same runs, same text


def test_a_curve_no_run_logged_is_named():
    lines = curve_verdicts(GRID, "train/losss")  # the runs' folders hold no metrics.jsonl
    assert lines == [
        "- not judged: no finished run logged 'train/losss' in its metrics.jsonl (the curve is "
        "the experiment's verdict.curve, default train/loss)"
    ]


EXPERIMENT = """\
name: small
task: digits_resnet
grid: {magnitude: [sgd, adam], direction: [sgd, adam]}
seeds: [0, 1]
metrics: [eval/loss]
"""


def test_the_verdict_key_sets_the_curve_and_the_resamples(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(EXPERIMENT + "verdict: {curve: eval/loss, resamples: 2000}\n")
    assert load_experiment(str(path)).verdict == {"curve": "eval/loss", "resamples": 2000}
    path.write_text(EXPERIMENT)
    assert load_experiment(str(path)).verdict == {}


@pytest.mark.parametrize(
    ("verdict", "bad"),
    [
        ("{resamples: 10}", "verdict.resamples: 10 is not an integer >= 100"),
        ("{resamples: 500.0}", "verdict.resamples: 500.0 is not an integer >= 100"),
        ("{curve: ''}", "verdict.curve: '' is not a non-empty string"),
        ("{curves: train/loss}", "verdict.curves: unknown key (value 'train/loss'); allowed: "),
        ("10000", "verdict: 10000 is not a mapping of curve, resamples"),
    ],
)
def test_a_bad_verdict_key_is_one_line(tmp_path, capsys, verdict, bad):
    path = tmp_path / "small.yaml"
    path.write_text(EXPERIMENT + f"verdict: {verdict}\n")
    line = assert_refused(table.main, ["graft-table", str(path)], bad, [tmp_path], capsys)
    assert str(path) in line
