"""The Hydra config tree: where it lives, its groups, and what a resumed run may change."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from graft.common.run_dir import cell_name

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Command-line group choices and the folder under configs/ their options come from.
GROUP_FOLDERS = {
    "task": "task",
    "optim@magnitude": "optim",
    "optim@direction": "optim",
    "graft": "graft",
    "schedule": "schedule",
    "trainer": "trainer",
    "logger": "logger",
}

# Keys a resumed run may change: they affect logging and speed, not the weights it reaches.
RESUMABLE_CHANGES = (
    "cache_dir",
    "logger",
    "trainer.progress",
    "trainer.log_every",
    "trainer.log_norms_every",
    "trainer.eval_every",
    "trainer.eval_batch_size",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.device",
    "graft.compile",
    "task.data.root",
)


def register_resolvers() -> None:
    """`${cell:M,D,enabled,static,schedule}` names a run's optimizers in paths (train.yaml)."""
    if not OmegaConf.has_resolver("cell"):
        OmegaConf.register_new_resolver("cell", cell_name)


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIGS / GROUP_FOLDERS[group]).glob("*.yaml"))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key: recorded -> current' for every key that changes what a run computes."""
    before, after = flatten(recorded), flatten(current)
    differences = []
    for key in sorted(set(before) | set(after)):
        if any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_CHANGES):
            continue
        # A key absent before is its null default: configs that gain an option stay resumable.
        if before.get(key) != after.get(key):
            differences.append(
                f"{key}: {before.get(key, '<absent>')} -> {after.get(key, '<absent>')}"
            )
    return differences
