"""`graft-compare RUN_DIR_OR_CELL ... [--out DIR]`: optimizer pairs side by side.

Each argument is a run directory (with summary.json) or a cell directory of a grid (its seed*/
run directories, as `outputs/<experiment>/<M>#<D>/`). Written to --out (default ./compare/):
compare.md (final metrics, mean ± std over seeds) and compare.png (training loss per step, mean
over seeds, and the median per-layer ‖u_M‖/‖u_D‖ of grafted runs: their implicit schedules).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from graft.grid.table import mean_loss_curve
from graft.train.errors import UserError, exit_with
from graft.transfer.recorded import implicit_schedules


def runs_of(path: Path) -> list[Path]:
    """The finished runs an argument names: itself, or its seed*/ runs."""
    if (path / "summary.json").exists():
        return [path]
    runs = sorted(run.parent for run in path.glob("seed*/summary.json"))
    if not runs:
        raise UserError(
            f"{path} has no summary.json and no seed*/summary.json: pass a finished run "
            "directory or a grid cell directory (outputs/<experiment>/<M>#<D>)"
        )
    return runs


def label_of(path: Path) -> str:
    return path.name if not path.name.startswith("seed") else f"{path.parent.name}/{path.name}"


def metrics_table(groups: dict[str, list[Path]]) -> str:
    summaries = {
        label: [json.loads((run / "summary.json").read_text()) for run in runs]
        for label, runs in groups.items()
    }
    keys = sorted(
        {key for group in summaries.values() for s in group for key in s if key.startswith("eval/")}
    )
    lines = [
        "| run | seeds | " + " | ".join(keys) + " | optimizer state MB |",
        "|---|---|" + "---|" * (len(keys) + 1),
    ]
    for label, group in summaries.items():
        finished = [s for s in group if s["status"] == "finished"]
        cells = []
        for key in keys:
            values = [s[key] for s in finished if key in s]
            spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.4f}{spread}" if values else "–")
        state = group[0]["optimizer_state_bytes"] / 1e6
        failed = len(group) - len(finished)
        seeds = f"{len(finished)}" + (f" ({failed} failed)" if failed else "")
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + f" | {state:.1f} |")
    return "\n".join(lines) + "\n"


def compare(paths: list[Path], out: Path) -> Path:
    groups = {label_of(path): runs_of(path) for path in paths}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(
        "# Comparison\n\n" + metrics_table(groups) + "\n![curves and schedules](compare.png)\n"
    )
    plot(groups, out / "compare.png")
    return out


def plot(groups: dict[str, list[Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (losses, schedules) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, runs in groups.items():
        losses.plot(*mean_loss_curve(runs), label=label)
        steps, ratios = implicit_schedules(runs[0])
        if steps:
            median = np.nanmedian(np.array(list(ratios.values())), axis=0)
            schedules.plot(steps, median, label=label)
    losses.set(xlabel="step", ylabel="train/loss (mean over seeds)", yscale="log")
    schedules.set(
        xlabel="step",
        ylabel="median ‖u_M‖ / ‖u_D‖",
        yscale="log",
        title="implicit schedule (grafted runs)",
    )
    losses.legend(fontsize="small")
    if schedules.lines:
        schedules.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(prog="graft-compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run or grid-cell directories")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="output folder")
    args = parser.parse_args()
    try:
        out = compare(args.runs, args.out)
    except UserError as error:
        exit_with("graft-compare", error)
    print((out / "compare.md").read_text())


if __name__ == "__main__":
    main()
