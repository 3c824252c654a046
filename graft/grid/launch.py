"""One Hydra multirun of graft-train: how grids, tuning sweeps and studies start their runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def multirun(overrides: list[str], sweep_dir: Path, subdir: str) -> int:
    """graft-train --multirun over `overrides` (comma-separated values sweep), each job in
    sweep_dir/subdir (a Hydra interpolation such as `lr${optimizers.sgd.lr}/seed${trainer.seed}`);
    the multirun's exit code (nonzero when some job failed)."""
    command = [
        sys.executable,
        "-m",
        "graft.train",
        "--multirun",
        *overrides,
        f"hydra.sweep.dir={sweep_dir.resolve()}",
        f"hydra.sweep.subdir='{subdir}'",
    ]
    return subprocess.run(command).returncode
