"""Data-parallel setup: one process per device, started by torchrun or by Slurm/submitit.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a submitit job (the
hydra-submitit-launcher's Slurm launcher) has them exported from its own environment first. With
one process nothing is initialised and every collective below is a no-op.

Gradients are averaged by DDP before the optimizer runs, so every rank holds the same gradient
and computes the same grafting norms and the same step: no extra communication for grafting.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from graft.train.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_submitit() -> None:
    """Export torch.distributed's variables from a submitit (Slurm) job's environment."""
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit.helpers

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def announced_ranks() -> int:
    """The world size a launcher set in the environment (torchrun, submitit), before setup."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(name, "").isdigit() and (
            name == "WORLD_SIZE" or "SUBMITIT_EXECUTOR" in os.environ
        ):
            return int(os.environ[name])
    return 1


def setup(backend: str, device_name: str, timeout_s: int) -> tuple[Ranks, torch.device]:
    """Join the process group (when launched with several processes); this rank's device.

    backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo. device_name: auto, cpu, cuda, or
    cuda:N (a single-process choice; under torchrun each rank takes cuda:LOCAL_RANK).
    timeout_s bounds every collective, so a rank that died stops the others instead of
    hanging them.
    """
    if backend not in BACKENDS:
        raise UserError(f"trainer.backend={backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    from_submitit()
    ranks = Ranks(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    device = resolve_device(device_name)
    if device.type == "cuda" and ranks.distributed:
        device = torch.device("cuda", ranks.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ranks.distributed and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(
            chosen,
            rank=ranks.rank,
            world_size=ranks.world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        log.info("rank %d of %d (%s) on %s", ranks.rank, ranks.world_size, chosen, device)
    return ranks, device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when there is a device, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"trainer.device={name!r} is not a device; allowed: auto, cpu, cuda, cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name!r} but no CUDA device is visible; use auto or cpu")
    if device.type == "cuda" and device.index is None:  # set_device and DDP need an index
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def all_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks (the tensor itself with one process)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a one-element list with one process)."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
