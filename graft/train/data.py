"""The training data stream: seeded, epoch after epoch, and resumable mid-epoch.

Each epoch is a permutation drawn from (seed, epoch) alone, so a resumed run that knows its
epoch and position reads exactly the micro-batches an uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from graft.tasks import Batch


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """A generator of its own per (seed, epoch, rank), hashed by numpy's SeedSequence because
    torch's CPU generator keeps only 32 bits of its seed."""
    mixed = np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(mixed))


class EpochSampler(Sampler[int]):
    """The indices rank `rank` of `world_size` reads in one epoch, from micro-batch `start_batch`.

    Every rank draws the same permutation, trims it to whole global micro-batches and takes
    every `world_size`-th index from its rank on (as torch's DistributedSampler does).
    """

    def __init__(
        self,
        size: int,
        micro_batch_size: int,
        *,
        seed: int,
        epoch: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.usable = (size // (micro_batch_size * world_size)) * micro_batch_size * world_size
        self.size, self.seed, self.epoch = size, seed, epoch
        self.start = start_batch * micro_batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=epoch_generator(self.seed, self.epoch))
        yield from order[: self.usable][self.rank :: self.world_size][self.start :].tolist()

    def __len__(self) -> int:
        return self.usable // self.world_size - self.start


class BatchStream:
    """Endless training micro-batches whose position (`state_dict`) goes into checkpoints."""

    def __init__(
        self,
        dataset: Dataset,
        micro_batch_size: int,
        *,
        seed: int,
        collate: Callable[[list[Any]], Batch] | None,
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset, self.micro_batch_size, self.seed = dataset, micro_batch_size, seed
        self.collate, self.num_workers, self.pin_memory = collate, num_workers, pin_memory
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(dataset) // (micro_batch_size * world_size)
        self.epoch = 0
        self.position = 0  # micro-batches already taken in this epoch
        self._batches: Iterator[Batch] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
        if self._batches is None:
            self._batches = iter(self._loader())
        batch = next(self._batches)
        self.position += 1
        return batch

    def _loader(self) -> DataLoader:
        sampler = EpochSampler(
            len(self.dataset),
            self.micro_batch_size,
            seed=self.seed,
            epoch=self.epoch,
            start_batch=self.position,
            rank=self.rank,
            world_size=self.world_size,
        )
        return DataLoader(
            self.dataset,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Workers' seeds (random augmentation, masking) follow the epoch and the rank, not
            # the global RNG. A resume restarts them at the resume point: exact resume of such
            # randomness needs num_workers=0, where it comes from the checkpointed global RNG.
            generator=epoch_generator(self.seed, self.epoch, self.rank),
        )

    @property
    def fractional_epoch(self) -> float:
        return self.epoch + self.position / self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        # epoch_samples: where the epoch stands whatever the ranks and micro-batches.
        samples = self.position * self.micro_batch_size * self.world_size
        return {"epoch": self.epoch, "position": self.position, "epoch_samples": samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the same sample of the same epoch: with other ranks or micro-batches
        (a sharded checkpoint's resume), the global batches read on are the same ones, since
        every rank draws the same permutation and takes every world_size-th index."""
        position = state["position"]
        if "epoch_samples" in state:  # absent in older checkpoints (same ranks only)
            position = state["epoch_samples"] // (self.micro_batch_size * self.world_size)
        self.epoch, self.position, self._batches = state["epoch"], position, None
