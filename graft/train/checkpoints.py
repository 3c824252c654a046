"""Checkpoints: written atomically, the newest few kept, loaded safely, with a fallback.

A checkpoint is one `torch.save` of plain containers and tensors (model, optimizer, scheduler,
data position, RNG states, counters), so it loads with `weights_only=True`. It is written to a
temporary file and renamed into place: a kill mid-write leaves the previous checkpoints intact.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from graft.common.errors import UserError

log = logging.getLogger(__name__)


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def saved_checkpoints(directory: Path) -> list[Path]:
    """The checkpoints in `directory`, oldest first."""
    return sorted(directory.glob("step_*.pt"))


def save_checkpoint(directory: Path, step: int, payload: Mapping[str, Any], keep: int) -> Path:
    """Write `payload` as the checkpoint of `step`, then delete all but the newest `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    write_atomically(path, lambda temporary: torch.save(dict(payload), temporary))
    for old in saved_checkpoints(directory)[:-keep]:
        old.unlink()
        shutil.rmtree(old.with_suffix(".dcp"), ignore_errors=True)  # a sharded run's shards
    return path


def load_newest_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads (an unreadable one is reported and skipped); None
    when there is none. UserError when there are checkpoints and none of them loads: the run
    cannot resume, and starting it over from step 0 would rewrite what it logged."""
    found = saved_checkpoints(directory)
    unreadable = []
    for path in reversed(found):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any corruption: truncated zip, bad pickle, bad tensor
            unreadable.append(
                (path, str(error).splitlines()[0] if str(error) else type(error).__name__)
            )
            continue
        for bad, reason in unreadable:  # said once the run resumes: a refusal writes nothing
            log.warning("checkpoint %s is unreadable (%s); trying the one before", bad, reason)
        return checkpoint
    if found:
        run_dir = directory.parent
        raise UserError(
            f"{found[-1]} is unreadable and no older checkpoint loads, so {run_dir} cannot "
            f"resume; to start it over, move {run_dir} away (or pick another hydra.run.dir=...)"
        )
    return None


def write_atomically(path: Path, write: Any) -> None:
    """Call `write(temporary_path)`, flush it to disk, and rename it to `path`."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
