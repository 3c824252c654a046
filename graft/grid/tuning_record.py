"""The tuning record, tuning.md: the learning rate graft-grid --tune chose for each optimizer.

graft/grid/tune.py writes it (beside the tuning runs and into results/<experiment>-tuned/);
an experiment takes its choices with `tuned_from: results/<experiment>-tuned` and `lr: tuned`
(graft/grid/experiment.py), so a tuned value is written once, here, and read where it is used.
Its parts, each written and read here:

    **Budget**: the grid's own: ...                 (BUDGET: at which settings tuning ran)
    | optimizer | lr | eval/loss (mean over seeds) | chosen | tried |
    | sgd | 0.03 | 0.0410 | **chosen** | listed |    (one row per value tried)
    | sgd | 0.009 | failed (1 of 1 seeds) |  | extension 1 (below) |
    ## Chosen
    - sgd: 0.03, bracketed                          (one line per optimizer)

Records written before the `tried` column, the budget line and the Chosen section (four
columns, nothing else) still give their chosen values.
"""

from __future__ import annotations

RECORD = "tuning.md"
TUNED = "tuned"  # an experiment's `lr: tuned`: the value its tuned_from record chose
CHOSEN = "**chosen**"
LISTED = "listed"  # a row's `tried`: a value of the tune.lr list (else "extension k (...)")
BUDGET = "**Budget**"
CHOSEN_SECTION = "## Chosen"
BRACKETED = "bracketed"


def table_header(metric: str) -> list[str]:
    return [
        f"| optimizer | lr | {metric} (mean over seeds) | chosen | tried |",
        "|---|---|---|---|---|",
    ]


def table_row(
    name: str,
    value: float,
    result: float | None,
    chosen: bool,
    *,
    failed: tuple[int, int] | None = None,
    tried: str = LISTED,
) -> str:
    """One value's row; `failed`: (failed seeds, seeds) of a value whose result is None."""
    if result is not None:
        shown = f"{result:.4f}"
    else:
        shown = "failed" if failed is None else f"failed ({failed[0]} of {failed[1]} seeds)"
    return f"| {name} | {value} | {shown} | {CHOSEN if chosen else ''} | {tried} |"


def chosen_lrs(text: str) -> dict[str, float]:
    """{optimizer: the learning rate marked chosen} from a record's text (rows of table_row)."""
    chosen = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) in (4, 5) and cells[3] == CHOSEN:
            try:
                chosen[cells[0]] = float(cells[1])
            except ValueError:
                continue
    return chosen


def budget_line(overrides: list[str]) -> str:
    """Whether the tuning runs had the grid's own settings, or which overrides they added."""
    if not overrides:
        return (
            f"{BUDGET}: the grid's own: the tuning runs have the grid's settings and budget "
            "(no tune.overrides)."
        )
    return (
        f"{BUDGET}: not the grid's: the tuning runs add tune.overrides "
        f"[{', '.join(overrides)}] to the grid's settings, so each lr was chosen for that "
        "budget, not for the grid's."
    )


def chosen_line(name: str, value: float, outcome: str) -> str:
    """The Chosen section's line of one optimizer: its lr and whether it was bracketed."""
    return f"- {name}: {value}, {outcome}"


def record_budget(text: str) -> str | None:
    """The budget line's words after "**Budget**: "; None for a record without one."""
    for line in text.splitlines():
        if line.startswith(BUDGET + ": "):
            return line[len(BUDGET) + 2 :]
    return None


def record_choices(text: str) -> list[str]:
    """The Chosen section's lines without their "- " ("sgd: 0.03, bracketed")."""
    lines = text.splitlines()
    if CHOSEN_SECTION not in lines:
        return []
    section = lines[lines.index(CHOSEN_SECTION) + 1 :]
    return [line[2:] for line in section if line.startswith("- ")]
