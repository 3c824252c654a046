"""A session's moving parts, built once: `build_run` makes the `Run` that the loop trains.

The order is the contract. Seeds first (every rank initialises the same model); the task (the
node leader first: it fills the caches the others read); model, optimizer, schedule, scaler and
data stream; a checkpoint's state loaded into them; and only then DDP (it broadcasts rank 0's
loaded weights) and the metrics log (it resumes at the checkpoint's step, in its W&B run).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from graft.common.errors import UserError
from graft.common.run_dir import CHECKPOINTS, cell_name
from graft.optim import Graft
from graft.tasks import Batch, DataError, Task, build_task
from graft.train import distributed
from graft.train.checks import DTYPES, schedule_message, split_batch
from graft.train.data import BatchStream
from graft.train.metrics import MetricsLog, NoMetrics
from graft.train.optimizer import build_optimizer
from graft.train.replay import replay_multipliers
from graft.train.schedules import ScheduleError, build_schedule
from graft.train.sharding import SHARDS, load_shards, shard_model
from graft.train.stopwatch import Stopwatch

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Counters carried across resumes (in every checkpoint, with the stopwatch's seconds)."""

    step: int = 0  # optimizer steps taken
    samples: int = 0  # training samples seen, over all ranks


@dataclass
class Run:
    """Everything one session trains with; graft/train/loop.py reads and advances it."""

    config: Mapping[str, Any]  # the resolved train.yaml as plain containers
    run_dir: Path
    ranks: distributed.Ranks
    device: torch.device
    stopwatch: Stopwatch
    task: Task
    model: nn.Module
    optimizer: Graft
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # fp16 loss scaling; a pass-through when off
    stream: BatchStream
    accumulation: int  # micro-batches per optimizer step
    eval_batches: DataLoader
    progress: Progress = field(default_factory=Progress)
    # Losses of the steps since the last log line: in each checkpoint, so a run resumed
    # between two log lines logs the same mean loss as an uninterrupted one.
    pending: list[Tensor] = field(default_factory=list)
    sharded: bool = False  # trainer.parallel=fsdp over several ranks (graft/train/sharding.py)
    # Set once the checkpoint is loaded (see the module's docstring):
    ddp: DistributedDataParallel | None = None
    forward: nn.Module | None = None  # the model, or its DDP and torch.compile wrappers
    metrics: MetricsLog | NoMetrics = field(default_factory=NoMetrics)

    @property
    def trainer(self) -> Mapping[str, Any]:
        return self.config["trainer"]

    @property
    def cell(self) -> str:
        """Named as its run directory is: "adam#adam" even though an identical M#M runs as M."""
        config = self.config
        return cell_name(
            config["magnitude"]["name"],
            config["direction"]["name"],
            config["graft"]["enabled"],
            config.get("static"),
            config["schedule"]["name"],
        )

    @property
    def name(self) -> str:
        return f"{self.task.name} {self.cell} seed{self.trainer['seed']}"

    def autocast(self) -> torch.autocast:
        dtype = torch.float16 if self.trainer["fp16"] else torch.bfloat16
        enabled = self.trainer["bf16"] or self.trainer["fp16"]
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def to_device(self, batch: Batch) -> Batch:
        """Tensors (in tuples, lists or dicts) onto the device; images channels-last if set."""
        if isinstance(batch, Tensor):
            batch = batch.to(self.device, non_blocking=True)
            if batch.is_floating_point():
                batch = batch.to(DTYPES[self.trainer["dtype"]])
            if self.trainer["channels_last"] and batch.ndim == 4 and batch.is_floating_point():
                batch = batch.contiguous(memory_format=torch.channels_last)
            return batch
        if isinstance(batch, Mapping):
            return type(batch)({key: self.to_device(value) for key, value in batch.items()})
        if isinstance(batch, list | tuple):
            return type(batch)(self.to_device(value) for value in batch)
        return batch

    def parts(self) -> dict[str, Any]:
        """The parts with a state of their own, under their keys in a checkpoint (a sharded
        run's model and optimizer go to its shards' folder instead)."""
        whole = {} if self.sharded else {"model": self.model, "optimizer": self.optimizer}
        return {**whole, "scheduler": self.scheduler, "data": self.stream, "scaler": self.scaler}

    def state_dict(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint: every part's state, every rank's RNG state (`rng`), the counters."""
        return {
            **{key: part.state_dict() for key, part in self.parts().items()},
            "rng": rng,
            "progress": {**asdict(self.progress), **self.stopwatch.state_dict()},
            "wandb_id": self.metrics.wandb_id,
            "pending_losses": torch.stack(self.pending).cpu() if self.pending else torch.zeros(0),
            "config": dict(self.config),
        }

    def load_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Resume from `checkpoint` (before DDP and the metrics log are made)."""
        ranks, sharded = len(checkpoint["rng"]), SHARDS in checkpoint
        if ranks != self.ranks.world_size and not sharded:
            raise UserError(
                f"{self.run_dir} was checkpointed by {ranks} ranks and this run has "
                f"{self.ranks.world_size}; resume with {ranks} processes (a run with "
                "trainer.parallel=fsdp resumes with any number)"
            )
        for key, part in self.parts().items():
            if key in ("model", "optimizer") and sharded:
                continue  # in the shards, loaded below
            part.load_state_dict(checkpoint[key])
        if sharded:  # into this run's shards, or whole tensors, whatever the ranks
            load_shards(self.model, self.optimizer, checkpoint, self.run_dir / CHECKPOINTS)
        if ranks != self.ranks.world_size:
            log.warning(
                "resuming a checkpoint of %d ranks with %d: the data goes on at the same "
                "sample, but dropout, masking and augmentation draw other random numbers",
                ranks,
                self.ranks.world_size,
            )
        if self.ranks.rank < ranks:  # a rank the checkpoint lacks keeps its fresh seed
            set_rng_state(checkpoint["rng"][self.ranks.rank], self.device)
        progress = checkpoint["progress"]
        self.progress = Progress(step=progress["step"], samples=progress["samples"])
        self.stopwatch.load_state_dict(progress)
        pending = checkpoint.get("pending_losses", torch.zeros(0))  # absent in older checkpoints
        self.pending = list(pending.to(self.device).unbind())


def build_run(
    config: Mapping[str, Any],
    run_dir: Path,
    checkpoint: Mapping[str, Any] | None,
    ranks: distributed.Ranks,
    device: torch.device,
    stopwatch: Stopwatch,
    record_config: Callable[[], None],
) -> Run:
    """The session's Run, resumed from `checkpoint` if given; every rank calls this.

    record_config writes the run's `.hydra/` (rank 0, once the checkpoint proved loadable).
    UserError for a task, data or batch split that does not fit.
    """
    trainer = config["trainer"]
    micro_batch_size, accumulation = split_batch(
        trainer["batch_size"], trainer["micro_batch_size"], ranks.world_size
    )
    seed = trainer["seed"]
    torch.manual_seed(seed)  # the same model initialisation on every rank
    random.seed(seed)
    if not ranks.main:  # rank 0 alone speaks
        logging.getLogger().setLevel(logging.WARNING)
    task = build_task_leader_first(config, ranks)
    if ranks.rank:  # dropout and masking: a stream of each rank's own from here on
        torch.manual_seed(seed + 1_000_003 * ranks.rank)
    model = task.model.to(device, dtype=DTYPES[trainer["dtype"]])
    if trainer["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    sharded = trainer["parallel"] == "fsdp" and ranks.distributed
    if sharded:  # before the optimizer: it steps the shards
        shard_model(model, device, ranks.world_size)
    optimizer = build_optimizer(model, config)
    run = Run(
        config=config,
        run_dir=run_dir,
        ranks=ranks,
        device=device,
        stopwatch=stopwatch,
        task=task,
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, config["schedule"], trainer["max_steps"]),
        stream=batch_stream(task, micro_batch_size, trainer, ranks, device),
        scaler=torch.amp.GradScaler(device.type, enabled=trainer["fp16"]),
        accumulation=accumulation,
        eval_batches=eval_batches(task, trainer, ranks),
        sharded=sharded,
    )
    wandb_id = None
    if checkpoint is not None:
        run.load_state_dict(checkpoint)
        wandb_id = checkpoint["wandb_id"]
        log.info("resuming %s from step %d", run_dir, run.progress.step)
    if ranks.main:
        record_config()
    if ranks.distributed and not sharded:
        run.ddp = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    wrapped = run.ddp or model
    run.forward = torch.compile(wrapped) if trainer["compile"] else wrapped
    if ranks.main:
        run.metrics = MetricsLog(
            run_dir,
            resume_step=run.progress.step,
            logger=config["logger"],
            config=config,
            run_name=f"{run.cell} seed{seed}",
            wandb_id=wandb_id,
        )
    return run


def build_task_leader_first(config: Mapping[str, Any], ranks: distributed.Ranks) -> Task:
    """The configured task, built by each node's leader before the others (they read its
    caches); UserError for a task or data that does not fit."""
    seed = config["trainer"]["seed"]
    try:
        with distributed.node_leader_first(ranks):
            task = build_task(config["task"], seed=seed, cache_dir=Path(config["cache_dir"]))
    except DataError as error:
        raise UserError(str(error)) from None
    except TypeError as error:  # a model keyword the model does not take
        raise UserError(f"task.model: {error} (fix the task config)") from None
    if len(task.eval_set) < ranks.world_size:
        raise UserError(
            f"the {task.name} eval split has {len(task.eval_set)} items, fewer than the "
            f"{ranks.world_size} ranks that share it; hold out more data"
        )
    return task


def batch_stream(
    task: Task,
    micro_batch_size: int,
    trainer: Mapping[str, Any],
    ranks: distributed.Ranks,
    device: torch.device,
) -> BatchStream:
    """This rank's endless stream of training micro-batches; UserError if none fits."""
    stream = BatchStream(
        task.train_set,
        micro_batch_size,
        seed=trainer["seed"],
        collate=task.collate,
        num_workers=trainer["num_workers"],
        pin_memory=device.type == "cuda",
        rank=ranks.rank,
        world_size=ranks.world_size,
    )
    if stream.batches_per_epoch == 0:
        raise UserError(
            f"the {task.name} train split has {len(task.train_set)} items, fewer than one "
            f"micro-batch of {micro_batch_size}; lower trainer.batch_size or "
            "trainer.micro_batch_size"
        )
    return stream


def eval_batches(task: Task, trainer: Mapping[str, Any], ranks: distributed.Ranks) -> DataLoader:
    """This rank's share of the held-out split (the sums are added over ranks)."""
    return DataLoader(
        task.eval_set,
        batch_size=trainer["eval_batch_size"],
        sampler=range(ranks.rank, len(task.eval_set), ranks.world_size),
        # Its own generator: starting an evaluation must not draw from the global RNG,
        # or how often a run evaluates would change its dropout and masking.
        generator=torch.Generator(),
        collate_fn=task.eval_collate or task.collate,
        num_workers=trainer["num_workers"],
    )


def make_scheduler(
    optimizer: Graft, schedule: Mapping[str, Any], max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The configured schedule; `replay` gives each one-tensor group its recorded schedule."""
    if schedule["name"] == "replay":
        names = [group["param_names"][0] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, replay_multipliers(schedule["run"], names, max_steps)
        )
    options = {key: value for key, value in schedule.items() if key != "name"}
    try:
        return build_schedule(optimizer, schedule["name"], max_steps, **options)
    except ScheduleError as error:
        raise UserError(schedule_message(error, "the task")) from None


def rng_state(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
