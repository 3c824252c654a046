"""The one training loop every task and every M#D cell runs through.

`train(config, run_dir)` trains the cell `config` describes inside `run_dir` and returns an
exit code. The same call on the same run directory resumes from the newest checkpoint (model,
both optimizer states, scheduler, data position, RNG), so on a CPU an interrupted run ends
bit-identical to an uninterrupted one; a run that already ended is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from graft.common.errors import NonFiniteLoss, UserError
from graft.common.run_dir import CHECKPOINTS, SUMMARY
from graft.optim.shards import local
from graft.tasks import DataError
from graft.train import distributed, preemption
from graft.train.checkpoints import checkpoint_path, load_newest_checkpoint, save_checkpoint
from graft.train.checks import check_before_building, refuse_other_config
from graft.train.run_lock import hold_run_dir
from graft.train.setup import Run, build_run, rng_state
from graft.train.sharding import SHARDS, save_shards
from graft.train.stopwatch import Stopwatch
from graft.train.summary import diverged, finish, report_ended_run

log = logging.getLogger(__name__)


def train(
    config: Mapping[str, Any], run_dir: Path, record_config: Callable[[], None] = lambda: None
) -> int:
    """Train (or resume, or skip) the run `config` describes in `run_dir`; the exit code.

    config: the resolved train.yaml as plain containers. record_config is called once the
    run is known to be this config's and everything built, to write the run's `.hydra/`.
    Raises UserError for a mistake in the config or the data, or when another job holds
    run_dir; StopRequested (a SystemExit) when a signal stopped it with a checkpoint.
    """
    # The rank that writes (rank 0) holds run_dir's lock.
    with preemption.stop_on_signals(), hold_run_dir(run_dir, writer=distributed.writes_files()):
        stopwatch = Stopwatch()  # the session's wall time starts here
        summary_path = run_dir / SUMMARY
        if summary_path.exists():  # ended: a rerun of the same config is a no-op, another refused
            refuse_other_config(config, run_dir, None)
            return report_ended_run(summary_path)
        checkpoint = load_newest_checkpoint(run_dir / CHECKPOINTS)
        refuse_other_config(config, run_dir, checkpoint)
        check_before_building(config)
        trainer = config["trainer"]
        ranks, device = distributed.setup(
            trainer["backend"], trainer["device"], trainer["timeout_s"]
        )
        try:
            run = build_run(config, run_dir, checkpoint, ranks, device, stopwatch, record_config)
            return train_built(run)
        finally:
            distributed.teardown()


def train_built(run: Run) -> int:
    """Train the built run to its last step and record how it ended; the exit code."""
    try:
        with logging_redirect_tqdm():
            status, ended = "finished", run_loop(run)
    except DataError as error:  # an unreadable item met mid-run (in a loader worker too)
        raise UserError(data_error_line(error)) from None
    except NonFiniteLoss as error:
        status, ended = "diverged", diverged(run, error)
    return finish(run, status, ended)


def run_loop(run: Run) -> dict[str, Any]:
    """Train to max_steps; returns the final evaluation and the last logged train loss."""
    trainer, progress, stopwatch = run.trainer, run.progress, run.stopwatch
    max_steps = trainer["max_steps"]
    bar = tqdm(
        total=max_steps,
        initial=progress.step,
        desc=run.name,
        unit="step",
        disable=not (trainer["progress"] and run.ranks.main),
        dynamic_ncols=True,
    )
    final: dict[str, Any] = {}
    run.model.train()
    stop = preemption.at_step_boundaries()  # a stop signal now waits for a step boundary
    stopwatch.start(progress.samples)
    try:
        while progress.step < max_steps:
            lr = run.optimizer.param_groups[0]["lr"]
            run.pending.append(train_step(run))
            progress.step += 1
            progress.samples += trainer["batch_size"]
            bar.update(1)
            step, last = progress.step, progress.step == max_steps
            log_now = last or every(step, trainer["log_every"])
            norms_now = every(step, trainer["log_norms_every"]) or (
                last and trainer["log_norms_every"] > 0  # 0: never, not even at the end
            )
            eval_now = last or every(step, trainer["eval_every"])
            stopping = stop.agreed(last=last)
            checkpoint_now = last or stopping or every(step, trainer["checkpoint_every"])
            if not (log_now or norms_now or eval_now or checkpoint_now):
                continue
            losses = checked_losses(run)  # waits for the device: the step times are now real
            if checkpoint_now:  # never keep (or finish with) weights that went non-finite
                check_weights(run)
            record: dict[str, Any] = {}
            if log_now:
                rate = stopwatch.samples_per_s(progress.samples)
                record["train/loss"] = losses.mean().item()
                record["train/lr"] = lr
                record["train/samples_per_s"] = round(rate, 2)
                record["train/epoch"] = round(run.stream.fractional_epoch, 4)
                run.pending = []
                bar.set_postfix(
                    loss=f"{record['train/loss']:.4g}", lr=f"{lr:.3g}", samples_s=f"{rate:.0f}"
                )
            if norms_now:
                record.update(step_norms(run))
            if eval_now:
                with stopwatch.paused():  # evaluation and checkpoints do not count as training
                    record.update(evaluate(run))
                if not math.isfinite(record.get("eval/loss", 0.0)):
                    raise NonFiniteLoss(step, "evaluation loss")
            final = {k: v for k, v in record.items() if k.startswith(("eval/", "train/loss"))}
            run.metrics.log(step, record)
            if checkpoint_now:
                with stopwatch.paused():
                    write_checkpoint(run)
            if stopping:
                stop_here(run, bar, stop.signum)
    finally:
        stopwatch.stop()  # training time ends with the last step, or with a failure
    bar.close()
    if not final:  # resumed from the last step's checkpoint: evaluate again (same result)
        final = evaluate(run)
    return final


def every(step: int, n: int) -> bool:
    """Whether `step` is a multiple of n (n = 0: never)."""
    return n > 0 and step % n == 0


def train_step(run: Run) -> Tensor:
    """One optimizer step over `accumulation` micro-batches; the step's mean loss."""
    total = torch.zeros((), device=run.device)
    for micro_step in range(run.accumulation):
        # DDP all-reduces gradients on the last micro-batch only.
        last = micro_step == run.accumulation - 1
        if run.sharded:  # FSDP2 reduce-scatters the gradients on the last one only
            run.model.set_requires_gradient_sync(last)
        with contextlib.nullcontext() if last or not run.ddp else run.ddp.no_sync():
            batch = run.to_device(next(run.stream))
            with run.autocast():
                loss = run.task.loss(run.forward, batch)
            run.scaler.scale(loss / run.accumulation).backward()
        total += loss.detach().float()
    # With fp16, unscaled before Graft measures anything; on inf/NaN neither M nor D steps.
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total / run.accumulation


def checked_losses(run: Run) -> Tensor:
    """Losses of the steps since the last log line; NonFiniteLoss names the first bad one."""
    losses = distributed.all_mean(torch.stack(run.pending))  # every rank stops together
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0])
        raise NonFiniteLoss(run.progress.step - len(losses) + 1 + first)
    return losses


def check_weights(run: Run) -> None:
    """NonFiniteLoss when any weight is NaN or infinite (on any rank)."""
    finite = torch.stack([local(param).isfinite().all() for param in run.model.parameters()])
    if distributed.all_mean(finite.all().float()).item() < 1:
        raise NonFiniteLoss(run.progress.step, "weights")


def step_norms(run: Run) -> dict[str, float]:
    """‖u_M‖ (and ‖u_D‖ when grafting) of the last step, by parameter name."""
    norms = run.optimizer.last_norms
    if norms is None:
        return {}
    name_of = {param: name for name, param in run.model.named_parameters()}
    names = [name_of[param] for param in norms.params]
    record = dict(zip((f"norms/magnitude/{n}" for n in names), norms.magnitude.tolist()))
    if run.optimizer.grafting():
        record.update(zip((f"norms/direction/{n}" for n in names), norms.direction.tolist()))
    return record


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Every eval_sums key averaged over the held-out split, as eval/<key>."""
    run.model.eval()
    totals: dict[str, Tensor] = {}
    batches = 0
    for batch in run.eval_batches:
        with run.autocast():
            sums = run.task.eval_sums(run.forward, run.to_device(batch))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0) + value.detach().double()
        batches += 1
    if run.sharded:  # every forward gathers each unit's weights: all ranks run as many
        for _ in range(most_eval_batches(run) - batches):
            with run.autocast():
                run.task.eval_sums(run.forward, run.to_device(batch))
    run.model.train()
    totals = {key: distributed.all_sum(value) for key, value in totals.items()}
    count = totals.pop("count")
    return {f"eval/{key}": (value / count).item() for key, value in totals.items()}


def most_eval_batches(run: Run) -> int:
    """The eval batches of rank 0, which has the most (ranks take every world_size-th item)."""
    items = -(-len(run.task.eval_set) // run.ranks.world_size)
    return -(-items // run.trainer["eval_batch_size"])


def write_checkpoint(run: Run) -> None:
    """Rank 0 writes; every rank's RNG state goes in (a collective: all ranks call this),
    and under FSDP each rank's shards, before rank 0's file that names them."""
    rng = distributed.gather(rng_state(run.device))
    directory, keep = run.run_dir / CHECKPOINTS, run.trainer["keep_checkpoints"]
    state = {}
    if run.sharded:
        path = checkpoint_path(directory, run.progress.step)
        state[SHARDS] = save_shards(run.model, run.optimizer, path)
    if run.ranks.main:
        save_checkpoint(directory, run.progress.step, {**run.state_dict(rng), **state}, keep)


def stop_here(run: Run, bar: tqdm, signum: int) -> NoReturn:
    """End the run on a stop signal, once this step's checkpoint is written."""
    bar.close()
    run.metrics.close()
    log.info(
        "%s: stopped at step %d with its checkpoint; the same command resumes %s",
        preemption.name(signum),
        run.progress.step,
        run.run_dir,
    )
    raise preemption.StopRequested(signum, run.progress.step)


def data_error_line(error: DataError) -> str:
    """The DataError's own line: a DataLoader worker's re-raise wraps it in its traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return last.split("DataError: ", 1)[-1]
