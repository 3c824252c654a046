"""What a run is called and what its directory holds, for every layer that writes or reads one.

graft-train writes a run directory; graft-grid, graft-table, graft-compare and graft-static
read it. Its folder (outputs/<task or experiment>/<cell>/seed<k>/...) and file names are
spelled here once; configs/train.yaml spells the same folder as Hydra's `hydra.run.dir`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# The files of a run directory.
SUMMARY = "summary.json"  # written last: status ("finished" or why not), final metrics, counters
METRICS = "metrics.jsonl"  # one JSON object per logged step: the source of truth
ERROR_LOG = "error.log"  # why the run ended in error: the reason first, then any details
CHECKPOINTS = "checkpoints"  # the newest few step checkpoints (graft/train/checkpoints.py)
MODEL = "model.safetensors"  # the final weights
HYDRA = ".hydra"  # Hydra's record of the run: config.yaml, hydra.yaml, overrides.yaml
CONFIG = f"{HYDRA}/config.yaml"  # the resolved config the run trained with

SEED_PREFIX = "seed"


def cell_name(
    magnitude: str,
    direction: str,
    grafting: bool,
    static: str | None = None,
    schedule: str | None = None,
) -> str:
    """ "adam#sgd" for a grafted pair; the magnitude's name alone without grafting; "+static"
    or "+replay" after it for per-layer learning rates carried over from a grafted run."""
    name = f"{magnitude}#{direction}" if grafting else magnitude
    if static:
        return name + "+static"
    return name + "+replay" if schedule == "replay" else name


def seed_folder(seed: int | str) -> str:
    """A run's folder under its cell: "seed3"; seed_folder("${trainer.seed}") is the same
    folder as a Hydra interpolation, for a sweep's subdir."""
    return f"{SEED_PREFIX}{seed}"


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json (raises OSError or ValueError when it is missing or torn)."""
    return json.loads((run_dir / SUMMARY).read_text())


def read_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config the run trained with, as plain containers."""
    return OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG))
