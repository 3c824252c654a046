"""Synthetic data: random items of a real task's shape, drawn on demand, for throughput checks.

`task.data.source: synthetic` gives a task items of the real data's shape (ImageNet-sized
images, BERT-sized token blocks) without the data: on a machine that has no ImageNet or no
hub, the full-scale model, trainer, sharding and optimizer run as they would on the real
thing. Item i of a split is drawn from a generator seeded by (split, i) alone, so it is the
same item every time it is read, in any loader worker, rank or resumed run, and nothing is
stored: a synthetic ImageNet of 1.28M images costs no memory. There is nothing to learn
beyond memorising labels; the loss says that the step ran, not that grafting works.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from graft.tasks.base import DataError

SPLITS = ("train", "eval")  # each split draws from seeds of its own
# Item i of split s has seed s * MAX_ITEMS + i: torch's CPU generator keeps 32 bits of a
# seed, so two splits of up to 2^31 items each never share one.
MAX_ITEMS = 2**31


class SyntheticSet(Dataset):
    """`size` items; item i is `draw(generator)` with a generator seeded by (split, i)."""

    def __init__(self, size: int, split: str, draw: Callable[[torch.Generator], Any]) -> None:
        self.size, self.draw = size, draw
        self.base = MAX_ITEMS * SPLITS.index(split)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} synthetic items")
        return self.draw(torch.Generator().manual_seed(self.base + index))


def check_size(data: Mapping[str, Any], key: str) -> int:
    """`data[key]` as a count of items (>= 1), or the DataError naming the value."""
    size = data.get(key)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_ITEMS:
        raise DataError(
            f"task.data.{key}={size!r} is invalid for task.data.source=synthetic; allowed: an "
            f"integer >= 1 and <= 2^31 (the number of synthetic items; fix task.data.{key})"
        )
    return size
