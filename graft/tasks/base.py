"""The Task interface: everything the one training loop needs to know about a task.

A task is data, not a class hierarchy: the model, the two splits, how to collate items into a
batch, the training loss, and the evaluation sums. The loop moves batches to the device, runs
`loss` under autocast for training, and for evaluation adds up `eval_sums` over the held-out
split and divides every sum by its `count` (so sums from several ranks or batches combine
exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

Batch = Any  # a tensor, a tuple of tensors, or a dict of tensors


class DataError(ValueError):
    """Data the task cannot use (a missing folder, an empty split): the user's to fix."""


@dataclass
class Task:
    """What a task hands the trainer.

    model: built on the CPU, in fp32, with the task's seed already applied to its init.
    train_set, eval_set: map-style datasets; the loop samples train_set itself (seeded,
        resumable) and reads eval_set in order.
    collate: train items -> Batch, or None for torch's default collate.
    eval_collate: eval items -> Batch (e.g. masks drawn once, so every evaluation agrees);
        None: the same as collate.
    loss: (model, batch) -> scalar mean loss of the batch (what backward runs on).
    eval_sums: (model, batch) -> {metric: sum over the batch's units, "count": units}.
        Metric m is reported as eval/m = Σ sums[m] / Σ sums["count"].
    """

    name: str
    model: nn.Module
    train_set: Dataset
    eval_set: Dataset
    collate: Callable[[list[Any]], Batch] | None
    loss: Callable[[nn.Module, Batch], Tensor]
    eval_sums: Callable[[nn.Module, Batch], dict[str, Tensor]]
    eval_collate: Callable[[list[Any]], Batch] | None = None
