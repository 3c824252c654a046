"""Data-parallel setup: one process per device, started by torchrun or by Slurm/submitit.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a submitit job (the
hydra-submitit-launcher's Slurm launcher) has them exported from its own environment first. With
one process nothing is initialised and every collective below is a no-op.

Besides the training backend (NCCL on GPUs) the ranks share a small gloo group on the CPU, the
control group: it carries the stop vote at step boundaries and the wait while the first rank of
each node prepares the data, which may take far longer than trainer.timeout_s.

Gradients are averaged by DDP before the optimizer runs, so every rank holds the same gradient
and computes the same grafting norms and the same step: no extra communication for grafting.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from graft.common.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")

# The control group's timeout: long enough for a node's first rank to tokenize a corpus while the
# others wait (a rank that dies ends the wait at once: gloo sees its connection close).
PREPARE_TIMEOUT = timedelta(hours=24)
# What a submitit job exports for torch.distributed besides the rendezvous address.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
LOOPBACK = ("localhost", "127.0.0.1", "::1")

_control: Any = None  # the control group, once setup() joined a process group


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
    """Export torch.distributed's variables from a submitit (Slurm) job's environment.

    A MASTER_ADDR or MASTER_PORT already set (an sbatch script's `export`, a cluster profile) is
    kept, where submitit's own export would refuse to run; a loopback MASTER_ADDR in a job of
    several nodes cannot reach the other nodes and gives way to the job's first host.
    """
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit.helpers

    job = submitit.helpers.TorchDistributedEnvironment()  # reads a preset MASTER_PORT itself
    nodes = job.world_size // job.local_world_size
    preset = os.environ.get("MASTER_ADDR")
    if preset is not None and preset in LOOPBACK and nodes > 1:
        log.warning(
            "MASTER_ADDR=%s cannot reach %d nodes; using the job's first host %s",
            preset,
            nodes,
            job.master_addr,
        )
        os.environ["MASTER_ADDR"] = job.master_addr
    os.environ.setdefault("MASTER_ADDR", job.master_addr)
    os.environ.setdefault("MASTER_PORT", str(job.master_port))
    ranks = (job.rank, job.world_size, job.local_rank, job.local_world_size)
    os.environ.update({name: str(value) for name, value in zip(RANK_VARIABLES, ranks)})


def writes_files() -> bool:
    """Whether this process writes the run's files (rank 0), known before any rendezvous.

    A process that no launcher gave a rank (plain `python -m graft.train`, or `srun` without
    torchrun, which starts independent processes) is a world of one: it writes its own files.
    """
    from_submitit()
    return int(os.environ.get("RANK", 0)) == 0


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
    check_choices(backend, device_name)
    from_submitit()
    ranks = Ranks(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    device = resolve_device(device_name)
    if device.type == "cuda" and ranks.distributed:
        device = rank_device(ranks.local_rank)
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
    global _control
    if ranks.distributed and _control is None:  # every rank creates it, at the same point
        _control = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    return ranks, device


def teardown() -> None:
    global _control
    _control = None
    if dist.is_initialized():
        dist.destroy_process_group()


def is_joined() -> bool:
    """Whether this process is one of several ranks (setup() joined their process group)."""
    return _control is not None


def rank_device(local_rank: int) -> torch.device:
    """The GPU of the rank with this local rank: cuda:LOCAL_RANK when the node's GPUs are all
    visible, else cuda:0 (per-task GPU binding: each rank sees only its own GPU)."""
    index = local_rank if local_rank < torch.cuda.device_count() else 0
    return torch.device("cuda", index)


def check_choices(backend: str, device_name: str) -> None:
    """UserError for a backend or device this machine cannot give (before any data is read)."""
    if backend not in BACKENDS:
        raise UserError(f"trainer.backend={backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    resolve_device(device_name)


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
        # Index 0, not current_device(): that would create a CUDA context on GPU 0 in every
        # rank before each takes its own (this check also runs before the run starts).
        device = torch.device("cuda", 0)
    return device


@contextlib.contextmanager
def node_leader_first(ranks: Ranks) -> Iterator[None]:
    """Run the block on each node's first rank (local rank 0) first, then on the others.

    For data preparation: the first rank fills the caches (a tokenizer, tokenized data) and the
    others read them. The others wait in the control group, whose timeout is PREPARE_TIMEOUT,
    not trainer.timeout_s; everyone leaves once every rank has run the block. A block that fails
    still passes both waits, so no rank is left waiting for it.
    """
    if _control is None:  # one process
        yield
        return
    leader = ranks.local_rank == 0
    if not leader:
        dist.barrier(group=_control)
    try:
        yield
    except Exception:
        wait_for_leaders_and_all(leader)
        raise
    wait_for_leaders_and_all(leader)


def wait_for_leaders_and_all(leader: bool) -> None:
    if leader:
        dist.barrier(group=_control)  # the others start
    dist.barrier(group=_control)  # everyone has built


def post_max(value: int) -> Callable[[], int]:
    """Start the max of `value` over ranks on the control group; call the result to wait for it.

    Posted at one step boundary and read at the next, its latency hides behind a training step.
    With one process the value comes back as it is.
    """
    if _control is None:
        return lambda: value
    tensor = torch.tensor([value], dtype=torch.int64)
    work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_control, async_op=True)

    def result() -> int:
        work.wait()
        return int(tensor.item())

    return result


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
