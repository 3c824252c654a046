"""The tuning record, tuning.md: the learning rate graft-grid --tune chose for each optimizer.

graft/grid/tune.py writes it (beside the tuning runs and into results/<experiment>-tuned/);
an experiment takes its choices with `tuned_from: results/<experiment>-tuned` and `lr: tuned`
(graft/grid/experiment.py), so a tuned value is written once, here, and read where it is used.
One table row per value tried:

    | optimizer | lr | eval/loss (mean over seeds) | chosen |
    | sgd | 0.03 | 0.0410 | **chosen** |
"""

from __future__ import annotations

RECORD = "tuning.md"
TUNED = "tuned"  # an experiment's `lr: tuned`: the value its tuned_from record chose
CHOSEN = "**chosen**"


def table_header(metric: str) -> list[str]:
    return [f"| optimizer | lr | {metric} (mean over seeds) | chosen |", "|---|---|---|---|"]


def table_row(name: str, value: float, result: float | None, chosen: bool) -> str:
    shown = "failed" if result is None else f"{result:.4f}"
    return f"| {name} | {value} | {shown} | {CHOSEN if chosen else ''} |"


def chosen_lrs(text: str) -> dict[str, float]:
    """{optimizer: the learning rate marked chosen} from a record's text (rows of table_row)."""
    chosen = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3] == CHOSEN:
            try:
                chosen[cells[0]] = float(cells[1])
            except ValueError:
                continue
    return chosen
