"""What produced a result: package versions, the git commit, the hardware."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("graft", "torch", "torchvision", "transformers", "datasets", "hydra-core", "wandb")
REPOSITORY = Path(__file__).resolve().parents[2]
# What graft writes into its own checkout: regenerating results/ (tracked) or runs in outputs/
# changes no code, so it does not make a checkout dirty (scripts/reproduce_cpu.sh: the same).
NOT_CODE = ("results", "outputs")
DIRTY = "-dirty"


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_sha(repo: Path = REPOSITORY) -> str | None:
    """The commit of the checkout at `repo` (graft's own by default), with '-dirty' when a
    tracked file outside NOT_CODE has local changes; None outside a git checkout."""
    pathspec = [":(top)", *(f":(top,exclude){folder}" for folder in NOT_CODE)]
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--"]
            + pathspec,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + (DIRTY if dirty else "")


def commits(shas: Iterable[str | None]) -> tuple[bool, list[str]]:
    """(whether every sha is one clean commit, the distinct shas in order, "unknown" for a
    run that recorded none); clean is False for no shas at all."""
    distinct = list(dict.fromkeys("unknown" if sha is None else sha for sha in shas))
    clean = len(distinct) == 1 and distinct[0] != "unknown" and not distinct[0].endswith(DIRTY)
    return clean, distinct


def hardware(device: torch.device) -> dict[str, str | int]:
    described: dict[str, str | int] = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described
