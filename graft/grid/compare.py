"""`graft-compare RUN_DIR_OR_CELL ... [--out DIR] [--force]`: optimizer pairs side by side.

Each argument is a run directory (with summary.json) or a cell directory of a grid (its seed*/
run directories, as `outputs/<experiment>/<M>#<D>/`). Written to --out (default ./compare/):
compare.md (final metrics, mean ± std over seeds) and compare.png (training loss per step, mean
over seeds, and the median per-layer ‖u_M‖/‖u_D‖ of grafted runs: their implicit schedules).
An --out that already holds a comparison is refused unless --force; the two files are written
under temporary names and renamed, so a failure leaves no half of them.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from graft.common.cli_parser import Parser
from graft.common.errors import UserError, exit_with
from graft.common.run_dir import SEED_PREFIX, SUMMARY, read_summary
from graft.grid.plots import mean_loss_curve
from graft.grid.publish import write_files
from graft.train.recorded import implicit_schedules

OUTPUT_FILES = ("compare.md", "compare.png")


def runs_of(path: Path) -> list[Path]:
    """The runs an argument names (itself, or its seed*/ runs), each with a readable
    summary.json; UserError naming the argument otherwise."""
    if not path.is_dir():
        raise UserError(
            f"{path} is not a folder: pass a finished run directory or a grid cell directory "
            "(outputs/<experiment>/<M>#<D>)"
        )
    if (path / SUMMARY).exists():
        runs = [path]
    else:
        runs = sorted(run.parent for run in path.glob(f"{SEED_PREFIX}*/{SUMMARY}"))
    if not runs:
        raise UserError(
            f"{path} has no summary.json and no seed*/summary.json: pass a finished run "
            "directory or a grid cell directory (outputs/<experiment>/<M>#<D>)"
        )
    for run in runs:
        try:
            read_summary(run)["status"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(
                f"{run / SUMMARY} is not a readable graft-train summary; rerun that run "
                "or leave it out"
            ) from None
    return runs


def label_of(path: Path) -> str:
    return path.name if not path.name.startswith(SEED_PREFIX) else f"{path.parent.name}/{path.name}"


def labelled(paths: list[Path]) -> dict[str, list[Path]]:
    """label -> runs; arguments whose short labels clash are labelled by their whole path."""
    labels = [label_of(path) for path in paths]
    groups: dict[str, list[Path]] = {}
    for path, label in zip(paths, labels):
        label = label if labels.count(label) == 1 else str(path)
        if label in groups:
            raise UserError(f"{path} is given twice; compare each run or cell once")
        groups[label] = runs_of(path)
    return groups


def metrics_table(groups: dict[str, list[Path]]) -> str:
    summaries = {label: [read_summary(run) for run in runs] for label, runs in groups.items()}
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
        state = (group[0].get("optimizer_state_bytes") or 0) / 1e6
        failed = len(group) - len(finished)
        seeds = f"{len(finished)}" + (f" ({failed} failed)" if failed else "")
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + f" | {state:.1f} |")
    return "\n".join(lines) + "\n"


def compare(paths: list[Path], out: Path, *, force: bool = False) -> Path:
    """Write compare.md and compare.png to `out`; UserError (nothing written) for an argument
    that is not a run or cell, or an `out` that holds a comparison already and not `force`."""
    groups = labelled(paths)
    earlier = [name for name in OUTPUT_FILES if (out / name).exists()]
    if earlier and not force:
        raise UserError(
            f"{out} already holds an earlier comparison ({', '.join(earlier)}); choose another "
            "--out, or pass --force to replace it"
        )
    text = "# Comparison\n\n" + metrics_table(groups) + "\n![curves and schedules](compare.png)\n"
    write_files(
        out,
        {
            "compare.md": lambda path: path.write_text(text),
            "compare.png": lambda path: plot(groups, path),
        },
    )
    return out


def plot(groups: dict[str, list[Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (losses, schedules) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, runs in groups.items():
        curve = mean_loss_curve(runs)
        if curve is not None:
            losses.plot(*curve, label=label)
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
    parser = Parser(prog="graft-compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run or grid-cell directories")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="output folder")
    parser.add_argument(
        "--force", action="store_true", help="replace a comparison already in --out"
    )
    args = parser.parse_args()
    try:
        out = compare(args.runs, args.out, force=args.force)
    except UserError as error:
        exit_with("graft-compare", error)
    print((out / "compare.md").read_text())


if __name__ == "__main__":
    main()
