"""The one training loop every task and every M#D cell runs through.

`train(config, run_dir)` trains the cell `config` describes inside `run_dir` and returns an
exit code. The same call on the same run directory resumes from the newest checkpoint (model,
both optimizer states, scheduler, data position, RNG), so on a CPU an interrupted run ends
bit-identical to an uninterrupted one; a run that already ended is left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_model
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from graft.common.errors import EXIT_RUN_FAILED, NonFiniteLoss, RunDirTaken, UserError
from graft.common.provenance import git_sha, hardware, versions
from graft.common.run_dir import cell_name
from graft.optim import Graft, state_bytes
from graft.tasks import Batch, DataError, Task, build_task
from graft.train import distributed, preemption
from graft.train.checkpoints import (
    load_newest_checkpoint,
    save_checkpoint,
    saved_checkpoints,
    write_atomically,
)
from graft.train.config import config_differences
from graft.train.data import BatchStream
from graft.train.metrics import MetricsLog, NoMetrics, wandb_mode
from graft.train.optimizer import build_optimizer, check_optimizer, optimizer_specs
from graft.train.replay import replay_multipliers
from graft.train.run_lock import hold_run_dir
from graft.train.schedules import ScheduleError, build_schedule, check_schedule

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Counters carried across resumes (they go into every checkpoint)."""

    step: int = 0  # optimizer steps taken
    samples: int = 0  # training samples seen, over all ranks
    train_seconds: float = 0.0  # time in training steps (no evaluation, no checkpoints)
    wall_seconds: float = 0.0  # time in this run's sessions, all included


def train(
    config: Mapping[str, Any], run_dir: Path, record_config: Callable[[], None] = lambda: None
) -> int:
    """Train (or resume, or skip) the run `config` describes in `run_dir`; the exit code.

    config: the resolved train.yaml as plain containers. record_config is called once the
    run is known to be this config's and everything built, to write the run's `.hydra/`.
    Raises UserError for a mistake in the config or the data, or when another job holds
    run_dir; StopRequested (a SystemExit) when a signal stopped it with a checkpoint.
    """
    with preemption.stop_on_signals(), hold_run_dir(run_dir, writer=distributed.writes_files()):
        return train_held(config, run_dir, record_config)


def train_held(config: Mapping[str, Any], run_dir: Path, record_config: Callable[[], None]) -> int:
    """train() under run_dir's lock (which the rank that writes, rank 0, holds)."""
    session_start = time.perf_counter()
    summary_path = run_dir / "summary.json"
    if summary_path.exists():  # ended: a rerun of the same config is a no-op, another refused
        refuse_other_config(config, run_dir, None)
        return report_ended_run(summary_path)
    checkpoint = load_newest_checkpoint(run_dir / "checkpoints")
    refuse_other_config(config, run_dir, checkpoint)
    check_before_building(config)

    trainer = config["trainer"]
    ranks, device = distributed.setup(trainer["backend"], trainer["device"], trainer["timeout_s"])
    try:
        return train_ranks(config, run_dir, record_config, checkpoint, ranks, device, session_start)
    finally:
        distributed.teardown()


def train_ranks(
    config: Mapping[str, Any],
    run_dir: Path,
    record_config: Callable[[], None],
    checkpoint: Mapping[str, Any] | None,
    ranks: distributed.Ranks,
    device: torch.device,
    session_start: float,
) -> int:
    """train() once the process group (if any) is up: every rank runs this."""
    trainer = config["trainer"]
    micro_batch_size, accumulation = split_batch(
        trainer["batch_size"], trainer["micro_batch_size"], ranks.world_size
    )
    seed = trainer["seed"]
    torch.manual_seed(seed)  # the same model initialisation on every rank
    random.seed(seed)
    if not ranks.main:  # rank 0 alone speaks
        logging.getLogger().setLevel(logging.WARNING)
    try:
        with distributed.node_leader_first(ranks):  # it fills the caches the others then read
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
    if ranks.rank:  # dropout and masking: a stream of each rank's own from here on
        torch.manual_seed(seed + 1_000_003 * ranks.rank)
    model = task.model.to(device, dtype=DTYPES[trainer["dtype"]])
    if trainer["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config["schedule"], trainer["max_steps"])
    stream = BatchStream(
        task.train_set,
        micro_batch_size,
        seed=seed,
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
    scaler = torch.amp.GradScaler(device.type, enabled=trainer["fp16"])
    progress = Progress()
    wandb_id = None
    pending = torch.zeros(0)
    if checkpoint is not None:
        if len(checkpoint["rng"]) != ranks.world_size:
            raise UserError(
                f"{run_dir} was checkpointed by {len(checkpoint['rng'])} ranks and this run has "
                f"{ranks.world_size}; resume with {len(checkpoint['rng'])} processes"
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        stream.load_state_dict(checkpoint["data"])
        set_rng_state(checkpoint["rng"][ranks.rank], device)
        progress = Progress(**checkpoint["progress"])
        wandb_id = checkpoint["wandb_id"]
        pending = checkpoint.get("pending_losses", pending)  # absent in older checkpoints
        log.info("resuming %s from step %d", run_dir, progress.step)
    if ranks.main:
        record_config()
    ddp = None
    if ranks.distributed:
        # Built after loading: DDP broadcasts rank 0's weights and buffers to every rank.
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    # Named as its run directory is: "adam#adam" even though an identical M#M runs as plain M.
    cell = cell_name(
        config["magnitude"]["name"],
        config["direction"]["name"],
        config["graft"]["enabled"],
        config.get("static"),
        config["schedule"]["name"],
    )
    metrics: MetricsLog | NoMetrics = NoMetrics()
    if ranks.main:
        metrics = MetricsLog(
            run_dir,
            resume_step=progress.step,
            logger=config["logger"],
            config=config,
            run_name=f"{cell} seed{seed}",
            wandb_id=wandb_id,
        )
    wrapped = ddp or model
    loop = Loop(
        task=task,
        model=model,
        forward=torch.compile(wrapped) if trainer["compile"] else wrapped,
        ddp=ddp,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        stream=stream,
        accumulation=accumulation,
        ranks=ranks,
        device=device,
        config=config,
        metrics=metrics,
        progress=progress,
        run_dir=run_dir,
        session_start=session_start,
        pending_losses=pending,
    )
    summary: dict[str, Any] = {
        "status": "finished",
        "cell": cell,
        "task": task.name,
        "grafting": optimizer.grafting(),
    }
    try:
        with logging_redirect_tqdm():
            summary.update(loop.run(desc=f"{task.name} {cell} seed{seed}"))
    except DataError as error:  # an unreadable item met mid-run (in a loader worker too)
        raise UserError(data_error_line(error)) from None
    except NonFiniteLoss as error:
        loop.count_training_time()  # up to the failure: the summary's rates stay true
        summary.update(status="diverged", error=str(error), failed_step=error.step)
        kept = saved_checkpoints(run_dir / "checkpoints")
        where = (
            f"the last good checkpoint is {kept[-1]}"
            if kept
            else f"no checkpoint was written before it (trainer.checkpoint_every="
            f"{trainer['checkpoint_every']})"
        )
        log.error("%s: stopping; %s", error, where)
        if ranks.main:
            write_error_log(run_dir, f"{error}; {where}")
    progress.wall_seconds = loop.wall_seconds()
    summary.update(
        steps=progress.step,
        wall_seconds=round(progress.wall_seconds, 3),
        train_seconds=round(progress.train_seconds, 3),
        samples_per_s=round(progress.samples / max(progress.train_seconds, 1e-9), 2),
        optimizer_state_bytes=state_bytes(optimizer),
        optimizers=dict(zip(("magnitude", "direction"), optimizer_specs(config))),
        parameters=sum(param.numel() for param in model.parameters()),
        versions=versions(),
        git_sha=git_sha(),
        hardware=hardware(device),
    )
    if ranks.main:
        if summary["status"] == "finished":
            write_atomically(
                run_dir / "model.safetensors", lambda path: save_model(model, str(path))
            )
        write_atomically(
            run_dir / "summary.json", lambda path: path.write_text(json.dumps(summary, indent=2))
        )
    metrics.close(summary)
    if summary["status"] != "finished":
        return EXIT_RUN_FAILED
    if ranks.main:
        log.info("finished %s: %s", run_dir, format_metrics(summary))
    return 0


@dataclass
class Loop:
    """The loop's moving parts and its one `run`."""

    task: Task
    model: nn.Module
    forward: nn.Module  # the model, or its DDP and torch.compile wrappers
    ddp: DistributedDataParallel | None
    optimizer: Graft
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # fp16 loss scaling; a pass-through when off
    stream: BatchStream
    accumulation: int
    ranks: distributed.Ranks
    device: torch.device
    config: Mapping[str, Any]
    metrics: MetricsLog | NoMetrics
    progress: Progress
    run_dir: Path
    session_start: float
    pending_losses: Tensor  # losses of the steps since the last log line (a resume's)

    def __post_init__(self) -> None:
        self.trainer = self.config["trainer"]
        self.wall_before = self.progress.wall_seconds
        self.names = {param: name for name, param in self.model.named_parameters()}
        self.eval_batches = DataLoader(
            self.task.eval_set,
            batch_size=self.trainer["eval_batch_size"],
            # Each rank scores its share; the sums are added over ranks.
            sampler=range(self.ranks.rank, len(self.task.eval_set), self.ranks.world_size),
            # Its own generator: starting an evaluation must not draw from the global RNG,
            # or how often a run evaluates would change its dropout and masking.
            generator=torch.Generator(),
            collate_fn=self.task.eval_collate or self.task.collate,
            num_workers=self.trainer["num_workers"],
        )
        # Losses of the steps since the last log line: in each checkpoint, so a run resumed
        # between two log lines logs the same mean loss as an uninterrupted one.
        self.pending: list[Tensor] = list(self.pending_losses.to(self.device).unbind())

    def autocast(self) -> torch.autocast:
        dtype = torch.float16 if self.trainer["fp16"] else torch.bfloat16
        enabled = self.trainer["bf16"] or self.trainer["fp16"]
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def run(self, desc: str) -> dict[str, Any]:
        """Train to max_steps; returns the final evaluation and the last logged train loss."""
        trainer, progress = self.trainer, self.progress
        max_steps = trainer["max_steps"]
        bar = tqdm(
            total=max_steps,
            initial=progress.step,
            desc=desc,
            unit="step",
            disable=not (trainer["progress"] and self.ranks.main),
            dynamic_ncols=True,
        )
        self.mark = time.perf_counter()  # training time is counted up to here
        window = (progress.train_seconds, progress.samples)  # at the last train log line
        final: dict[str, Any] = {}
        self.model.train()
        stop = preemption.at_step_boundaries()  # a stop signal now waits for a step boundary
        while progress.step < max_steps:
            lr = self.optimizer.param_groups[0]["lr"]
            self.pending.append(self.train_step())
            progress.step += 1
            progress.samples += trainer["batch_size"]
            bar.update(1)
            step = progress.step
            due = {
                name: step == max_steps or (trainer[every] > 0 and step % trainer[every] == 0)
                for name, every in (
                    ("log", "log_every"),
                    ("norms", "log_norms_every"),
                    ("eval", "eval_every"),
                    ("checkpoint", "checkpoint_every"),
                )
            }
            due["norms"] &= trainer["log_norms_every"] > 0  # 0: never, not even at the end
            stopping = stop.agreed(last=step == max_steps)
            due["checkpoint"] |= stopping
            if not any(due.values()):
                continue
            losses = self.checked_losses()  # waits for the device: the step times are now real
            if due["checkpoint"]:  # never keep (or finish with) weights that went non-finite
                self.check_weights()
            now = self.count_training_time()
            record: dict[str, Any] = {}
            if due["log"]:
                rate = (progress.samples - window[1]) / max(
                    progress.train_seconds - window[0], 1e-9
                )
                window = (progress.train_seconds, progress.samples)
                record["train/loss"] = losses.mean().item()
                record["train/lr"] = lr
                record["train/samples_per_s"] = round(rate, 2)
                record["train/epoch"] = round(self.stream.fractional_epoch, 4)
                self.pending = []
                bar.set_postfix(
                    loss=f"{record['train/loss']:.4g}", lr=f"{lr:.3g}", samples_s=f"{rate:.0f}"
                )
            if due["norms"]:
                record.update(self.step_norms())
            paused = time.perf_counter()  # evaluation and checkpoints do not count as training
            if due["eval"]:
                record.update(self.evaluate())
                if not math.isfinite(record.get("eval/loss", 0.0)):
                    raise NonFiniteLoss(step, "evaluation loss")
            paused = time.perf_counter() - paused
            final = {k: v for k, v in record.items() if k.startswith(("eval/", "train/loss"))}
            self.metrics.log(step, record)
            if due["checkpoint"]:
                started = time.perf_counter()
                self.save_checkpoint()
                paused += time.perf_counter() - started
            self.mark = now + paused  # so the next count includes logging but not the pause
            if stopping:
                self.stop(bar, stop.signum)
        bar.close()
        if not final:  # resumed from the last step's checkpoint: evaluate again (same result)
            final = self.evaluate()
        return final

    def count_training_time(self) -> float:
        """Add the training time since the last mark to progress; now (the new mark)."""
        now = time.perf_counter()
        self.progress.train_seconds += now - self.mark
        self.mark = now
        return now

    def stop(self, bar: tqdm, signum: int) -> NoReturn:
        """End the run on a stop signal, once this step's checkpoint is written."""
        bar.close()
        self.metrics.close()
        log.info(
            "%s: stopped at step %d with its checkpoint; the same command resumes %s",
            preemption.name(signum),
            self.progress.step,
            self.run_dir,
        )
        raise preemption.StopRequested(signum, self.progress.step)

    def train_step(self) -> Tensor:
        """One optimizer step over `accumulation` micro-batches; the step's mean loss."""
        total = torch.zeros((), device=self.device)
        for micro_step in range(self.accumulation):
            # DDP all-reduces gradients on the last micro-batch only.
            last = micro_step == self.accumulation - 1
            with contextlib.nullcontext() if last or not self.ddp else self.ddp.no_sync():
                batch = self.to_device(next(self.stream))
                with self.autocast():
                    loss = self.task.loss(self.forward, batch)
                self.scaler.scale(loss / self.accumulation).backward()
            total += loss.detach().float()
        # With fp16, unscaled before Graft measures anything; on inf/NaN neither M nor D steps.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / self.accumulation

    def checked_losses(self) -> Tensor:
        """Losses of the steps since the last log line; NonFiniteLoss names the first bad one."""
        losses = distributed.all_mean(torch.stack(self.pending))  # every rank stops together
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0])
            raise NonFiniteLoss(self.progress.step - len(losses) + 1 + first)
        return losses

    def check_weights(self) -> None:
        """NonFiniteLoss when any weight is NaN or infinite (on any rank)."""
        finite = torch.stack([param.detach().isfinite().all() for param in self.model.parameters()])
        if distributed.all_mean(finite.all().float()).item() < 1:
            raise NonFiniteLoss(self.progress.step, "weights")

    def step_norms(self) -> dict[str, float]:
        """‖u_M‖ (and ‖u_D‖ when grafting) of the last step, by parameter name."""
        norms = self.optimizer.last_norms
        if norms is None:
            return {}
        names = [self.names[param] for param in norms.params]
        record = dict(zip((f"norms/magnitude/{n}" for n in names), norms.magnitude.tolist()))
        if self.optimizer.grafting():
            record.update(zip((f"norms/direction/{n}" for n in names), norms.direction.tolist()))
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every eval_sums key averaged over the held-out split, as eval/<key>."""
        self.model.eval()
        totals: dict[str, Tensor] = {}
        for batch in self.eval_batches:
            with self.autocast():
                sums = self.task.eval_sums(self.forward, self.to_device(batch))
            for key, value in sums.items():
                totals[key] = totals.get(key, 0) + value.detach().double()
        self.model.train()
        totals = {key: distributed.all_sum(value) for key, value in totals.items()}
        count = totals.pop("count")
        return {f"eval/{key}": (value / count).item() for key, value in totals.items()}

    def save_checkpoint(self) -> None:
        """Rank 0 writes; every rank's RNG state goes in (a collective: all ranks call this)."""
        rng = distributed.gather(rng_state(self.device))
        if not self.ranks.main:
            return
        self.progress.wall_seconds = self.wall_seconds()
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.stream.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "progress": asdict(self.progress),
            "wandb_id": self.metrics.wandb_id,
            "pending_losses": torch.stack(self.pending).cpu() if self.pending else torch.zeros(0),
            "config": dict(self.config),
        }
        save_checkpoint(
            self.run_dir / "checkpoints",
            self.progress.step,
            payload,
            self.trainer["keep_checkpoints"],
        )

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.session_start

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


def data_error_line(error: DataError) -> str:
    """The DataError's own line: a DataLoader worker's re-raise wraps it in its traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return last.split("DataError: ", 1)[-1]


def report_ended_run(summary_path: Path) -> int:
    summary = json.loads(summary_path.read_text())
    if summary["status"] == "finished":
        log.info(
            "%s already finished at step %d: nothing to do (%s)",
            summary_path.parent,
            summary["steps"],
            format_metrics(summary),
        )
        return 0
    log.error(
        "%s already ended: %s; nothing to do (delete its summary.json to retry from the "
        "last checkpoint)",
        summary_path.parent,
        summary.get("error", summary["status"]),
    )
    return EXIT_RUN_FAILED


def refuse_other_config(
    config: Mapping[str, Any], run_dir: Path, checkpoint: Mapping[str, Any] | None
) -> None:
    """UserError when run_dir already holds a run of a config that computes differently."""
    recorded_path = run_dir / ".hydra" / "config.yaml"
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


# Parameter dtypes (trainer.dtype): float64 is for exactness checks, such as DDP = one process.
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# trainer keys checked before anything is built: (test, what is allowed)
TRAINER_LIMITS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "micro_batch_size": (lambda v: v is None or (isinstance(v, int) and v >= 1), "null or >= 1"),
    "max_steps": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "eval_batch_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "eval_every": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0: at the end)"),
    "log_every": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "log_norms_every": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0: never)"),
    "checkpoint_every": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "keep_checkpoints": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "num_workers": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "seed": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "timeout_s": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1 (seconds)"),
    "dtype": (lambda v: v in DTYPES, " or ".join(DTYPES)),
    **{
        switch: (lambda v: isinstance(v, bool), "true or false")
        for switch in ("bf16", "fp16", "channels_last", "compile", "decay_1d", "progress")
    },
}


def check_trainer(trainer: Mapping[str, Any]) -> None:
    for key, (ok, allowed) in TRAINER_LIMITS.items():
        if not ok(trainer[key]):
            raise UserError(f"trainer.{key}={trainer[key]!r} is invalid; allowed: {allowed}")
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


def write_error_log(run_dir: Path, reason: str, details: str = "") -> None:
    """run_dir/error.log: why the run ended in error (first line), then any details."""
    text = reason.strip() + "\n" + (details.rstrip() + "\n" if details else "")
    write_atomically(run_dir / "error.log", lambda path: path.write_text(text))


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


def format_metrics(summary: Mapping[str, Any]) -> str:
    shown = {key: value for key, value in summary.items() if key.startswith(("eval/", "train/"))}
    return ", ".join(f"{key} {value:.4g}" for key, value in sorted(shown.items()))
