"""The results folder's figures (graft/grid/plots.py) on small fake sweeps written the way
graft-train writes runs (summary.json, metrics.jsonl with loss and norm lines, the final
weights' shapes in model.safetensors), and the tensor roles on real models' parameter names."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgba
from matplotlib.figure import Figure
from safetensors.numpy import save_file

from graft.grid.experiment import Experiment
from graft.grid.plots import (
    NOISE_WIDTHS,
    SCHEDULE_AXIS,
    across_seeds,
    colour_limits,
    curves_figure,
    heatmap_figure,
    luminance,
    mean_loss_curve,
    schedule_figure,
    schedule_free,
    tensor_roles,
)
from graft.grid.studies import curves_figure as study_curves_figure
from graft.grid.studies import multipliers_figure, trend_figure, tuning_figure
from graft.grid.table import Cell, Runs, gather, write_results
from graft.train.recorded import Recorded
from graft.transfer.trend import fit_trend

OPTIMIZERS = ["sgd", "adam", "adagrad", "lars", "lamb"]
# A small ResNet's parameters in model order: the roles are conv1, layer2.0's conv1 and fc.
TENSORS = {
    "conv1.weight": (4, 1, 3, 3),
    "bn1.weight": (4,),
    "bn1.bias": (4,),
    "layer1.0.conv1.weight": (4, 4, 3, 3),
    "layer1.0.bn1.weight": (4,),
    "layer2.0.conv1.weight": (4, 4, 3, 3),
    "layer2.0.downsample.1.weight": (4,),
    "layer3.0.conv1.weight": (4, 4, 3, 3),
    "fc.weight": (10, 4),
    "fc.bias": (10,),
}
STEPS = range(5, 101, 5)  # the loss and norm lines' steps
CONFIG = (  # what the schedule plot reads of a run's config: a constant schedule, s(t) = 1
    "logger: {name: none}\nschedule: {name: constant, warmup_steps: 0}\ntrainer: {max_steps: 100}\n"
)


def write_run(run_dir: Path, m: int, d: int, seed: int, status: str = "finished") -> None:
    """One run of cell (M index m, D index d): loss falling at a rate the magnitude sets, norms
    whose ratio per tensor is a constant times a trend the pair sets, and seed noise."""
    rng = np.random.default_rng(1000 * m + 100 * d + seed)
    run_dir.mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra/config.yaml").write_text(CONFIG)
    lines = []
    for step in STEPS:
        loss = 2.0 * math.exp(-(0.02 + 0.01 * m + 0.002 * d) * step) * rng.uniform(0.8, 1.25)
        lines.append({"step": step, "train/loss": loss})
        if m != d:
            norms = {}
            for index, name in enumerate(TENSORS):
                scale = 10.0 ** (index % 4 - 1) * (1 + 0.5 * seed)  # the lrs: constant factors
                trend = (1 + step / 100) ** ((m - d) * (1 + index % 3)) * rng.uniform(0.9, 1.1)
                norms[f"norms/magnitude/{name}"] = scale * trend
                norms[f"norms/direction/{name}"] = 1.0
            lines.append({"step": step, **norms})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    top1 = 0.5 + 0.08 * m + 0.01 * d + rng.normal(0, 0.01)
    summary = {"status": status, "eval/top1": top1, "train/loss": loss}
    summary |= {
        "hardware": {"device": "cpu", "cpu_threads": 1},
        "wall_seconds": 1.0,
        "optimizers": {},
    }
    if status != "finished":
        summary["error"] = "non-finite training loss at step 7"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if status == "finished":
        save_file(
            {name: np.zeros(shape, np.float32) for name, shape in TENSORS.items()},
            str(run_dir / "model.safetensors"),
        )


def fake_sweep(
    root: Path, size: int, seeds: int = 3, failed: dict[str, list[int]] | None = None
) -> tuple[Experiment, list[Cell]]:
    """A size x size grid of the first `size` optimizers; `failed`: cell -> seeds that
    diverged (-1: every seed's folder missing)."""
    names = OPTIMIZERS[:size]
    experiment = Experiment(
        name=f"fake{size}x{size}",
        description="A fake sweep.",
        task="digits_resnet",
        magnitudes=names,
        directions=names,
        seeds=list(range(seeds)),
        metrics=["eval/top1", "train/loss"],
    )
    failed = failed or {}
    for (m, a), (d, b) in itertools.product(enumerate(names), repeat=2):
        cell = f"{a}#{b}"
        if failed.get(cell) == [-1]:
            continue
        for seed in range(seeds):
            status = "diverged" if seed in failed.get(cell, []) else "finished"
            write_run(root / cell / f"seed{seed}", m, d, seed, status)
    return experiment, gather(experiment, root)


def legend_texts(figure: Figure) -> list[str]:
    legends = [*figure.legends, *(axis.get_legend() for axis in figure.axes)]
    return [text.get_text() for legend in legends if legend for text in legend.get_texts()]


def visible_axes(figure: Figure) -> list:
    return [axis for axis in figure.axes if axis.get_visible() and axis.get_label() != "<colorbar>"]


def overlaps(figure: Figure) -> list[str]:
    """What overlaps once drawn: any two of the titles, the figure's labels, the legends and
    the panels (a panel with its own title or legend, or two panels, excepted), and anything
    that leaves the figure."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    blocks = []  # (what, the panel it belongs to or None, its box)
    for name in ("_suptitle", "_supxlabel", "_supylabel"):
        text = getattr(figure, name)
        if text is not None and text.get_text():
            blocks.append((name, None, text.get_window_extent(renderer)))
    for index, legend in enumerate(figure.legends):
        blocks.append((f"figure legend {index}", None, legend.get_window_extent(renderer)))
    for index, axis in enumerate(axis for axis in figure.axes if axis.get_visible()):
        if axis.axison:
            blocks.append((f"panel {index}", index, axis.get_window_extent(renderer)))
        if axis.get_title():
            blocks.append((f"title {axis.get_title()!r}", index, axis.title.get_window_extent()))
        for label in (axis.xaxis.label, axis.yaxis.label):
            if label.get_text():
                blocks.append((f"label {label.get_text()!r}", index, label.get_window_extent()))
        if axis.get_legend():
            box = axis.get_legend().get_window_extent(renderer)
            blocks.append((f"legend of panel {index}", index, box))
    found = [
        f"{a} overlaps {b}"
        for (a, owner_a, box_a), (b, owner_b, box_b) in itertools.combinations(blocks, 2)
        if box_a.overlaps(box_b)
        and (owner_a is None or owner_a != owner_b)
        and not (a.startswith("panel") and b.startswith("panel"))
    ]
    edge = figure.bbox
    found += [
        f"{name} leaves the figure"
        for name, _, box in blocks
        if box.x0 < edge.x0 - 1
        or box.x1 > edge.x1 + 1
        or box.y0 < edge.y0 - 1
        or box.y1 > edge.y1 + 1
    ]
    return found


@pytest.fixture(scope="module")
def sweeps(module_tmp) -> dict[int, tuple[Experiment, list[Cell]]]:
    root = module_tmp
    failed = {"sgd#adam": [1], "adam#sgd": [-1]}  # one diverged seed; a cell never run
    return {
        size: fake_sweep(root / f"{size}", size, failed=failed if size > 1 else None)
        for size in (1, 2, 3, 5)
    }


def test_write_results_writes_the_three_plots_beside_the_table(tmp_path):
    experiment, _ = fake_sweep(tmp_path / "outputs", 2, seeds=2)
    written = write_results(experiment, tmp_path / "outputs", tmp_path / "results")
    for name in ("heatmap.png", "curves.png", "schedule.png"):
        assert (written.folder / name).read_bytes()[:4] == b"\x89PNG"
    # The same runs give the same images.
    again = write_results(experiment, tmp_path / "outputs", tmp_path / "again")
    for name in ("heatmap.png", "curves.png", "schedule.png"):
        assert (again.folder / name).read_bytes() == (written.folder / name).read_bytes()


@pytest.mark.parametrize("size", [1, 2, 3, pytest.param(5, marks=pytest.mark.slow)])
def test_no_title_label_or_legend_overlaps_another(sweeps, size):
    experiment, cells = sweeps[size]
    figures = [heatmap_figure(experiment, cells), curves_figure(experiment, cells)]
    if size > 1:
        figures.append(schedule_figure(experiment, cells))
    for figure in figures:
        assert overlaps(figure) == []


def test_curves_are_one_panel_per_magnitude_a_line_per_direction_with_seed_bands(sweeps):
    experiment, cells = sweeps[5]
    figure = curves_figure(experiment, cells)
    panels = [axis for axis in figure.axes if axis.axison]
    assert [axis.get_title() for axis in panels] == [f"magnitude M = {m}" for m in OPTIMIZERS]
    assert len(figure.axes) == 6 and not figure.axes[5].axison  # 2 x 3, the legend in the 6th
    assert all(axis.get_yscale() == "log" for axis in panels)
    assert panels[0].get_shared_y_axes().joined(panels[0], panels[4])
    legend = figure.axes[5].get_legend()
    assert "colour = direction D, panel = magnitude M" in legend.get_title().get_text()
    assert "solid = M#M (plain M)" in legend.get_title().get_text()
    texts = [text.get_text() for text in legend.get_texts()]
    assert texts == [
        *(f"D = {d}" for d in OPTIMIZERS),
        "M#M (plain M)",
        "M#D (grafted)",
        "band: lowest..highest seed",
    ]
    # Panel M = lars: one line per D, lars#lars thick and solid, the rest dashed, D's colour.
    lars = panels[3]
    styles = {
        to_hex(line.get_color()): (line.get_linestyle(), line.get_linewidth())
        for line in lars.get_lines()
    }
    colours = [to_hex(handle.get_color()) for handle in legend.legend_handles[:5]]
    assert list(styles) == colours
    assert styles[colours[3]] == ("-", 2.6)
    assert {styles[colour] for i, colour in enumerate(colours) if i != 3} == {("--", 1.3)}
    assert len(lars.collections) == 5  # a band per line
    # The line is the mean over seeds, the band their lowest and highest.
    cell = next(cell for cell in cells if cell.name == "lars#adam")
    losses = [
        [
            json.loads(line)["train/loss"]
            for line in (run / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line
        ]
        for run in cell.run_dirs
    ]
    line = lars.get_lines()[1]
    assert line.get_ydata()[-1] == pytest.approx(np.mean([loss[-1] for loss in losses]))
    band = lars.collections[1].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(min(min(loss) for loss in losses))
    # Fewer seeds, or none, are said in the panel.
    assert legend_texts(figure).count("sgd#adam: 2 of 3 seeds") == 1
    assert "adam#sgd: no finished seed" in legend_texts(figure)


def test_curves_of_a_one_cell_grid_are_one_panel(sweeps):
    experiment, cells = sweeps[1]
    figure = curves_figure(experiment, cells)
    (panel,) = visible_axes(figure)
    assert [line.get_linestyle() for line in panel.get_lines()] == ["-"]
    assert not [axis.get_legend() for axis in figure.axes if axis.get_legend()]  # all 3 seeds


def test_seed_bands_use_the_steps_every_seed_logged():
    band = across_seeds(
        [(np.array([1, 2, 3]), np.array([1.0, 2.0, 4.0])), (np.array([2, 3]), np.array([4.0, 1.0]))]
    )
    assert band.steps.tolist() == [2, 3] and band.centre.tolist() == [3.0, 2.5]
    assert (band.low.tolist(), band.high.tolist(), band.seeds) == ([2.0, 1.0], [4.0, 4.0], 2)
    geometric = across_seeds(
        [(np.array([1]), np.array([2.0])), (np.array([1]), np.array([8.0]))], geometric=True
    )
    assert geometric.centre.tolist() == [pytest.approx(4.0)]
    assert across_seeds([(np.array([1]), np.array([np.nan]))]) is None


def test_the_heatmap_colour_range_spans_four_times_the_largest_sem(sweeps):
    experiment, cells = sweeps[3]
    figure = heatmap_figure(experiment, cells)
    axis = next(axis for axis in figure.axes if axis.images)
    image = axis.images[0]
    values = {cell.name: cell.values["eval/top1"] for cell in cells}
    sems = [np.std(v, ddof=1) / math.sqrt(len(v)) for v in values.values() if len(v) > 1]
    low, high = image.norm.vmin, image.norm.vmax
    assert high - low >= NOISE_WIDTHS * max(sems) - 1e-12
    means = [np.mean(v) for v in values.values() if v]
    assert low <= min(means) and high >= max(means)
    # The cell's text: mean ± s.e.m.; n when seeds failed; "failed" where none finished.
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in axis.texts}
    plain = values["sgd#sgd"]
    sem = np.std(plain, ddof=1) / math.sqrt(3)
    places = len(texts[0, 0].get_text().split("\n")[0].split(".")[1])
    smallest = min(sems)
    assert 2 <= places <= 4 and f"{smallest:.{places}f}".strip("0.") != ""  # shown, not 0.000
    assert texts[0, 1].get_text().endswith("\nn = 2")
    assert texts[0, 0].get_text() == f"{np.mean(plain):.{places}f}\n± {sem:.{places}f}"
    assert texts[1, 0].get_text() == "failed"
    colorbar = next(a for a in figure.axes if a.get_label() == "<colorbar>")
    assert (
        colorbar.get_ylabel()
        == "eval/top1, mean over 3 seeds (n where fewer)\n(brighter is better)"
    )
    # Every cell's text contrasts with its colour at least as WCAG asks of text (4.5).
    for (i, j), text in texts.items():
        mean = image.get_array()[i, j]
        if not np.ma.is_masked(mean):
            cell = luminance(image.cmap(image.norm(mean)))
            ink = luminance(to_rgba(text.get_color()))
            assert (max(cell, ink) + 0.05) / (min(cell, ink) + 0.05) >= 4.5


def test_ties_within_the_noise_get_near_identical_colours():
    means = np.array([[0.50, 0.51], [0.52, np.nan]])
    sems = np.array([[0.02, 0.02], [0.01, np.nan]])
    low, high = colour_limits(means, sems)
    assert high - low == pytest.approx(4 * 0.02) and (low + high) / 2 == pytest.approx(0.51)
    # Far apart means keep their own range.
    assert colour_limits(np.array([0.1, 0.9]), np.array([0.01, 0.01])) == pytest.approx((0.1, 0.9))
    # One value with no noise known still gets a range around it.
    low, high = colour_limits(np.array([0.5]), np.array([np.nan]))
    assert low < 0.5 < high


def test_the_schedule_is_the_grid_relative_to_the_first_value_by_tensor_role(sweeps):
    experiment, cells = sweeps[3]
    figure = schedule_figure(experiment, cells)
    assert len(figure.axes) == 9
    hidden = [i for i, axis in enumerate(figure.axes) if not axis.get_visible()]
    assert hidden == [0, 4, 8]  # the diagonal: plain M, nothing grafted
    titles = [axis.get_title() for axis in visible_axes(figure)]
    assert titles == [
        "sgd#adam (2 of 3 seeds)",
        "sgd#adagrad",
        "adam#sgd (0 of 3 seeds)",
        "adam#adagrad",
        "adagrad#sgd",
        "adagrad#adam",
    ]
    assert figure._supylabel.get_text() == SCHEDULE_AXIS
    assert SCHEDULE_AXIS == "‖u_M‖/‖u_D‖ ÷ lr schedule, relative to its first logged value"
    assert legend_texts(figure) == [
        "stem: conv1.weight",
        "middle block: layer2.0.conv1.weight",
        "head: fc.weight",
        f"median over all {len(TENSORS)} tensors",
        "band: lowest..highest seed",
        "1: as at the first logged step",
    ]
    panel = visible_axes(figure)[4]  # adagrad#sgd
    lines = panel.get_lines()[:4]  # stem, middle, head, median; then the line at 1
    for line in lines:
        assert line.get_ydata()[0] == 1.0  # every seed's ratio over its own first value
    # The stem's last value: the geometric mean over seeds of its relative ratio.
    cell = next(cell for cell in cells if cell.name == "adagrad#sgd")
    relatives = []
    for run_dir in cell.run_dirs:
        norms = [
            json.loads(line)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "norms" in line
        ]
        ratios = [line["norms/magnitude/conv1.weight"] for line in norms]
        relatives.append(ratios[-1] / ratios[0])
    assert lines[0].get_ydata()[-1] == pytest.approx(math.exp(np.mean(np.log(relatives))))
    assert all(axis.get_yscale() == "log" for axis in visible_axes(figure))


def test_no_schedule_without_a_grafted_cell(sweeps):
    experiment, cells = sweeps[1]
    assert schedule_figure(experiment, cells) is None


def test_tensor_roles_of_torchvision_resnet18():
    from torchvision.models import resnet18

    shapes = {name: tuple(p.shape) for name, p in resnet18().named_parameters()}
    assert tensor_roles(shapes) == {
        "stem": "conv1.weight",
        "middle block": "layer3.0.conv1.weight",
        "head": "fc.weight",
    }


def test_tensor_roles_of_a_tiny_bert_for_masked_lm():
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    shapes = {name: tuple(p.shape) for name, p in BertForMaskedLM(config).named_parameters()}
    assert tensor_roles(shapes) == {
        "stem": "bert.embeddings.word_embeddings.weight",
        "middle block": "bert.encoder.layer.2.attention.self.query.weight",
        "head": "cls.predictions.transform.dense.weight",  # the decoder is tied to the stem
    }


def test_tensor_roles_never_pick_biases_or_norm_scales_and_handle_small_models():
    assert tensor_roles({"weight": (3, 2), "bias": (3,)}) == {"stem": "weight"}
    roles = tensor_roles(
        {
            "0.weight": (4, 2),
            "0.bias": (4,),
            "1.weight": (4,),
            "2.weight": (3, 4),
            "4.weight": (2, 3),
        }
    )
    assert roles == {"stem": "0.weight", "middle block": "2.weight", "head": "4.weight"}
    assert tensor_roles({"scale": (3,)}) == {}


def test_mean_loss_curve_is_the_seed_mean(sweeps):
    _, cells = sweeps[2]
    cell = cells[0]
    steps, mean = mean_loss_curve(cell.run_dirs)
    assert steps == list(STEPS) and len(mean) == len(STEPS)
    assert mean_loss_curve([]) is None


def test_study_curves_have_seed_bands_and_the_trend_explains_its_line_styles(sweeps):
    experiment, cells = sweeps[2]
    figure = study_curves_figure(experiment, {cell.name: cell for cell in cells})
    (axis,) = figure.axes
    assert len(axis.collections) == 3  # adam#sgd has no finished seed: said, not drawn
    assert "adam#sgd: no finished seed" in legend_texts(figure)
    assert "sgd#adam (2 of 3 seeds)" in legend_texts(figure)
    assert "band: lowest..highest seed" in legend_texts(figure)
    assert overlaps(figure) == []
    steps = np.arange(10, 110, 10)
    trend = fit_trend(
        Recorded(
            Path("run"),
            steps,
            {"a": 0.5 + 0.01 * steps},
            {"trainer": {"max_steps": 100}, "schedule": {"name": "constant"}},
        )
    )
    figure = trend_figure(experiment, {"seed0": trend, "seed1": trend}, "sgd#adam")
    assert legend_texts(figure) == [
        "seed0",
        "seed1",
        "q(t) as logged",
        "linear fit",
        "power-law fit",
    ]
    assert overlaps(figure) == []


def test_the_multipliers_and_tuning_figures_keep_their_titles_apart(sweeps):
    experiment, _ = sweeps[2]
    content = {
        "multipliers": {name: 0.5 + index for index, name in enumerate(TENSORS)},
        "magnitude": "adam",
        "direction": "sgd",
        "window": [16, 150],
        "reduce": "median",
        "source": "outputs/st/adam#sgd/seed0",
    }
    figure = multipliers_figure(experiment, content)
    (axis,) = figure.axes
    assert [tick.get_text() for tick in axis.get_xticklabels()] == list(TENSORS)
    assert "adam#sgd seed0: one run" in axis.get_title()
    assert overlaps(figure) == []

    def runs(*values):
        return Runs({"eval/top1": list(values)}, [], [], 3)

    sweep = {0.01: runs(0.5, 0.52, 0.55), 0.1: runs(0.6, 0.61, 0.65)}
    figure = tuning_figure(experiment, sweep, runs(0.58, 0.6), "adam#sgd")
    assert "adam#sgd, one trial at M's lr (2 of 3 seeds)" in legend_texts(figure)
    assert figure.axes[0].get_ylabel() == "eval/top1 (mean ± s.e.m. over 3 seeds)"
    assert figure.axes[0].get_yscale() == "linear"  # an accuracy; a loss is drawn on a log scale
    assert overlaps(figure) == []


def test_the_schedule_plot_divides_out_the_lr_schedule(tmp_path):
    # The trainer's schedule scales M's step, not D's: a ratio that follows a linear decay
    # exactly is no implicit schedule at all, and reads as 1 at every step.
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra/config.yaml").write_text(
        "schedule: {name: linear, warmup_steps: 0}\ntrainer: {max_steps: 100}\n"
    )
    lines = [
        {"step": step, "norms/magnitude/w": 3.0 * (1 - (step - 1) / 100), "norms/direction/w": 1.0}
        for step in range(10, 101, 10)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    steps, ratios = schedule_free(run_dir)
    assert list(steps) == list(range(10, 101, 10))
    assert np.allclose(ratios["w"], 3.0)
