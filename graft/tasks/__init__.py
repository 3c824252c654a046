"""Tasks: image classification and masked- or causal-LM pretraining, each a model + data + loss +
metrics."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graft.tasks.base import Batch, DataError, Task

KINDS = ("image_classification", "masked_lm", "causal_lm")


def build_task(cfg: Mapping[str, Any], *, seed: int, cache_dir: Path) -> Task:
    """The task described by the `task` config (its `kind` picks the module).

    Call after seeding torch: model initialisation draws from the global RNG. `cache_dir`
    keeps what a task derives once (a trained tokenizer), for every run that shares it.
    """
    kind = cfg["kind"]
    if kind == "image_classification":
        from graft.tasks.image_classification import build
    elif kind in ("masked_lm", "causal_lm"):
        from graft.tasks.masked_lm import build
    else:
        raise DataError(f"unknown task.kind {kind!r}; allowed: {', '.join(KINDS)}")
    return build(cfg, seed=seed, cache_dir=cache_dir)


__all__ = ["KINDS", "Batch", "DataError", "Task", "build_task"]
