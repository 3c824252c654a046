"""One row of gpu_check's report: a case, what was measured, and whether it passed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Check:
    section: str
    case: str
    error: float | None  # the measured difference, where there is one
    tolerance: float | None
    passed: bool
    note: str = ""
