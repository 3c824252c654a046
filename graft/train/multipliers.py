"""`static=PATH`: the per-layer learning-rate multipliers a run reads (from graft-static derive).

The file is JSON with a `multipliers` table, parameter name -> m_i (graft/transfer/static.py
writes it, with how the values were derived); the run's tensor i trains at lr · m_i.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from graft.common.errors import UserError


def load_multipliers(path: str | Path, names: list[str]) -> dict[str, float]:
    """name -> multiplier for exactly `names` (the model's trainable parameters); UserError
    naming the file and the first mismatches otherwise."""
    where = f"static={path}"
    try:
        content = json.loads(Path(path).read_text())
        multipliers = content["multipliers"]
    except FileNotFoundError:
        raise UserError(
            f"{where}: no such file (make one with graft-static derive RUN_DIR)"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{where}: not a multipliers file from graft-static derive") from None
    missing = [name for name in names if name not in multipliers]
    unknown = [name for name in multipliers if name not in set(names)]
    if missing or unknown:
        raise UserError(
            f"{where}: its parameter names do not match the model's (missing: "
            f"{', '.join(missing[:3]) or 'none'}; not in the model: "
            f"{', '.join(unknown[:3]) or 'none'}); derive it from a run of the same task and model"
        )
    bad = [
        name
        for name in names
        if not (
            isinstance(multipliers[name], float | int)
            and multipliers[name] > 0
            and math.isfinite(multipliers[name])
        )
    ]
    if bad:
        raise UserError(
            f"{where}: multiplier {multipliers[bad[0]]!r} for {bad[0]}; allowed: a finite "
            "number > 0"
        )
    return {name: float(multipliers[name]) for name in names}
