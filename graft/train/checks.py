"""What a run checks before it builds anything, so that a mistake costs no data scan.

graft-train makes these checks before Hydra starts (graft/train/cli.py) and every run makes
them again before it builds its task: a user mistake is a UserError naming the key to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from graft.common.errors import RunDirTaken, UserError
from graft.common.run_dir import CONFIG
from graft.common.validation import BOOLEAN, Allowed, at_least, first_refused, one_of, optional
from graft.train import distributed
from graft.train.config import config_differences
from graft.train.metrics import wandb_mode
from graft.train.optimizer import check_optimizer
from graft.train.replay import replay_multipliers
from graft.train.schedules import ScheduleError, check_schedule

# Parameter dtypes (trainer.dtype): float64 is for exactness checks, such as DDP = one process.
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# trainer.parallel: whole copies on every rank, or FSDP2's shards (graft/train/sharding.py).
PARALLEL = ("ddp", "fsdp")
COUNT = at_least(1, integer=True)
EVERY = at_least(0, integer=True)

# The trainer keys checked before anything is built, in the order they are checked.
TRAINER_LIMITS: dict[str, Allowed] = {
    "batch_size": COUNT,
    "micro_batch_size": optional(COUNT),
    "max_steps": COUNT,
    "eval_batch_size": COUNT,
    "eval_every": EVERY.noting("0: at the end"),
    "log_every": COUNT,
    "log_norms_every": EVERY.noting("0: never"),
    "checkpoint_every": EVERY,
    "keep_checkpoints": COUNT,
    "num_workers": EVERY,
    "seed": EVERY,
    "timeout_s": COUNT.noting("seconds"),
    "dtype": one_of(DTYPES),
    "parallel": one_of(PARALLEL),
    **{
        switch: BOOLEAN
        for switch in ("bf16", "fp16", "channels_last", "compile", "decay_1d", "progress")
    },
}


def check_before_building(config: Mapping[str, Any]) -> None:
    """Everything that can be checked without data or a model, so that a mistake is reported
    before an ImageFolder scan or a tokenization: the trainer, W&B, optimizers, schedule."""
    trainer = config["trainer"]
    check_trainer(trainer)
    distributed.check_choices(trainer["backend"], trainer["device"])
    # The process count a launcher announces (torchrun, or 1): the batch must split over it.
    split_batch(trainer["batch_size"], trainer["micro_batch_size"], distributed.announced_ranks())
    wandb_mode(config["logger"])
    check_optimizer(config)
    schedule, max_steps = config["schedule"], config["trainer"]["max_steps"]
    if schedule["name"] == "replay":
        replay_multipliers(schedule["run"], [], max_steps)
        return
    options = {key: value for key, value in schedule.items() if key != "name"}
    try:
        check_schedule(schedule["name"], max_steps, **options)
    except ScheduleError as error:
        raise UserError(schedule_message(error, config["task"]["name"])) from None


def check_trainer(trainer: Mapping[str, Any]) -> None:
    key = first_refused(trainer, TRAINER_LIMITS)
    if key is not None:
        raise UserError(
            f"trainer.{key}={trainer[key]!r} is invalid; allowed: {TRAINER_LIMITS[key].text}"
        )
    if trainer["bf16"] and trainer["fp16"]:
        raise UserError("trainer.bf16 and trainer.fp16 are both true; choose one")


def split_batch(batch_size: int, micro_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) with micro x ranks x steps = batch_size."""
    if batch_size % world_size:
        raise UserError(
            f"trainer.batch_size={batch_size} does not split over {world_size} ranks; "
            f"use a multiple of {world_size}"
        )
    per_rank = batch_size // world_size
    micro = micro_batch_size or per_rank
    if per_rank % micro:
        raise UserError(
            f"trainer.micro_batch_size={micro} does not divide the per-rank batch {per_rank} "
            f"(trainer.batch_size={batch_size} over {world_size} ranks); use a divisor of it"
        )
    return micro, per_rank // micro


def schedule_message(error: ScheduleError, task: str) -> str:
    """The schedule's complaint and the keys that fix it (a task may set the schedule's)."""
    if error.key is None:
        return f"{error} (choose schedule=NAME)"
    if error.key == "max_steps":
        fixes = "set trainer.max_steps=..."
    else:
        fixes = f"set schedule.{error.key}=..."
        if "max_steps" in str(error):  # a bound set by the run's length
            fixes += " or trainer.max_steps=..."
    return f"{error} ({fixes}; task={task} sets the schedule's defaults)"


def refuse_other_config(
    config: Mapping[str, Any], run_dir: Path, checkpoint: Mapping[str, Any] | None
) -> None:
    """UserError when run_dir already holds a run of a config that computes differently."""
    recorded_path = run_dir / CONFIG
    if recorded_path.exists():
        recorded = OmegaConf.to_container(OmegaConf.load(recorded_path), resolve=True)
    elif checkpoint is not None:
        recorded = checkpoint["config"]
    else:
        return
    differences = config_differences(recorded, config)
    if differences:
        shown = "; ".join(differences[:4]) + (" ..." if len(differences) > 4 else "")
        raise RunDirTaken(
            f"{run_dir} holds a run with another config ({shown}); rerun it with its own "
            "settings, or pick a new folder with hydra.run.dir=..."
        )
