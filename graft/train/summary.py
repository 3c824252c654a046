"""How a run ended, on disk and in the log: summary.json, error.log, the end-of-run lines.

summary.json is written last (with the final weights, model.safetensors, before it when the
run finished): its presence means the run ended, and a rerun of the same config reads it
instead of training again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file, save_model

from graft.common.errors import EXIT_RUN_FAILED, NonFiniteLoss
from graft.common.provenance import git_sha, hardware, versions
from graft.common.run_dir import CHECKPOINTS, ERROR_LOG, MODEL, SUMMARY
from graft.optim import state_bytes
from graft.train.checkpoints import saved_checkpoints, write_atomically
from graft.train.optimizer import optimizer_specs
from graft.train.setup import Run
from graft.train.sharding import full_weights

log = logging.getLogger(__name__)


def finish(run: Run, status: str, ended: Mapping[str, Any]) -> int:
    """Record how the run ended (status "finished" with its final metrics, or "diverged" with
    its error) and close its metrics log; the exit code. Every rank calls this; rank 0 writes."""
    summary = summarize(run, status, ended)
    finished = summary["status"] == "finished"
    weights = full_weights(run.model) if finished and run.sharded else None  # a collective
    if run.ranks.main:
        if weights is not None:
            write_atomically(run.run_dir / MODEL, lambda path: save_file(weights, str(path)))
        elif finished:
            write_atomically(run.run_dir / MODEL, lambda path: save_model(run.model, str(path)))
        write_atomically(
            run.run_dir / SUMMARY,
            lambda path: path.write_text(json.dumps(summary, indent=2)),
        )
    run.metrics.close(summary)
    if summary["status"] != "finished":
        return EXIT_RUN_FAILED
    if run.ranks.main:
        log.info("finished %s: %s", run.run_dir, format_metrics(summary))
    return 0


def summarize(run: Run, status: str, ended: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json: what ran and how it ended, how long and how fast, with what, where.

    train_seconds counts the steps only (see graft/train/stopwatch.py), up to a failure
    too; samples_per_s is the samples over it.
    """
    train_seconds = run.stopwatch.train_seconds
    return {
        "status": status,
        "cell": run.cell,
        "task": run.task.name,
        "grafting": run.optimizer.grafting(),
        **ended,
        "steps": run.progress.step,
        "wall_seconds": round(run.stopwatch.wall_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "samples_per_s": round(run.progress.samples / max(train_seconds, 1e-9), 2),
        "optimizer_state_bytes": state_bytes(run.optimizer),
        "optimizers": dict(zip(("magnitude", "direction"), optimizer_specs(run.config))),
        "parameters": sum(param.numel() for param in run.model.parameters()),
        "versions": versions(),
        "git_sha": git_sha(),
        "hardware": hardware(run.device),
    }


def diverged(run: Run, error: NonFiniteLoss) -> dict[str, Any]:
    """How a run stopped by a non-finite value ended (for its summary), said in the log and
    in error.log with where its last good checkpoint is."""
    kept = saved_checkpoints(run.run_dir / CHECKPOINTS)
    where = (
        f"the last good checkpoint is {kept[-1]}"
        if kept
        else f"no checkpoint was written before it (trainer.checkpoint_every="
        f"{run.trainer['checkpoint_every']})"
    )
    log.error("%s: stopping; %s", error, where)
    if run.ranks.main:
        write_error_log(run.run_dir, f"{error}; {where}")
    return {"error": str(error), "failed_step": error.step}


def report_ended_run(summary_path: Path) -> int:
    """Say how the run of summary_path ended (a rerun does nothing else); its exit code."""
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


def write_error_log(run_dir: Path, reason: str, details: str = "") -> None:
    """run_dir/error.log: why the run ended in error (first line), then any details."""
    text = reason.strip() + "\n" + (details.rstrip() + "\n" if details else "")
    write_atomically(run_dir / ERROR_LOG, lambda path: path.write_text(text))


def format_metrics(summary: Mapping[str, Any]) -> str:
    shown = {key: value for key, value in summary.items() if key.startswith(("eval/", "train/"))}
    return ", ".join(f"{key} {value:.4g}" for key, value in sorted(shown.items()))
