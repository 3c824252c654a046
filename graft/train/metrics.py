"""Where metrics go: `metrics.jsonl` (the source of truth) and, when on, Weights & Biases.

Every line of metrics.jsonl is one JSON object with `step` and metric keys (`train/loss`,
`eval/top1`, `norms/magnitude/<parameter>` ...). A resumed run first drops the lines written
after its checkpoint, so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from graft.train.checkpoints import write_atomically
from graft.train.errors import UserError

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl; a torn last line (a kill mid-write) is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def has_wandb_credentials() -> bool:
    """Whether W&B would find credentials: WANDB_API_KEY (or an identity token) or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host or "") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(logger: Mapping[str, Any]) -> tuple[str, str] | None:
    """(online or offline, why), or None with W&B off. WANDB_MODE wins over logger.mode."""
    if logger["name"] == "none":
        return None
    mode, source = logger["mode"], "logger.mode"
    if os.environ.get("WANDB_MODE"):
        mode, source = os.environ["WANDB_MODE"], "WANDB_MODE"
    if mode == "disabled":
        return None
    if mode not in WANDB_MODES:
        raise UserError(
            f"{source}={mode!r} is not a W&B mode; allowed: {', '.join(WANDB_MODES)} "
            "(or logger=none to turn W&B off)"
        )
    if mode == "auto":
        if has_wandb_credentials():
            return "online", "credentials found"
        return "offline", "no credentials found"
    return mode, f"{source}={mode}"


class MetricsLog:
    """Appends metric lines to run_dir/metrics.jsonl and mirrors them to a W&B run."""

    def __init__(
        self,
        run_dir: Path,
        *,
        resume_step: int,
        logger: Mapping[str, Any],
        config: Mapping[str, Any],
        run_name: str,
        wandb_id: str | None,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        kept = [line for line in read_metrics(self.path) if line["step"] <= resume_step]
        write_atomically(
            self.path, lambda temporary: temporary.write_text("".join(map(to_line, kept)))
        )
        self.file = open(self.path, "a")  # noqa: SIM115 - open for the whole run
        self.wandb_run = None
        self.wandb_id = wandb_id
        mode = wandb_mode(logger)
        if mode is not None:
            self.wandb_run = start_wandb(run_dir, *mode, logger, config, run_name, wandb_id)
            self.wandb_id = self.wandb_run.id

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.file.write(to_line({"step": step, **metrics}))
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=step)

    def close(self, summary: Mapping[str, Any] | None = None) -> None:
        self.file.close()
        if self.wandb_run is not None:
            if summary:
                self.wandb_run.summary.update(dict(summary))
            self.wandb_run.finish()


def to_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record) + "\n"


def start_wandb(
    run_dir: Path,
    mode: str,
    why: str,
    logger: Mapping[str, Any],
    config: Mapping[str, Any],
    run_name: str,
    wandb_id: str | None,
    *,
    group: str | None = None,
    job_type: str = "train",
) -> Any:
    """A W&B run in run_dir/wandb (group: logger.group unless given)."""
    import wandb  # imported here: W&B is slow to import and optional per run

    if mode == "offline":
        log.info("W&B: offline (%s); upload later with `wandb sync %s/wandb`", why, run_dir)
    else:
        log.info("W&B: online (%s), project %s", why, logger["project"])
    return wandb.init(
        project=logger["project"],
        entity=logger.get("entity"),
        group=group or logger.get("group"),
        job_type=job_type,
        tags=list(logger.get("tags") or []),
        name=run_name,
        id=wandb_id,
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        config=dict(config),
    )


class NoMetrics:
    """What ranks other than 0 log to: nothing."""

    wandb_id = None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def close(self, summary: Mapping[str, Any] | None = None) -> None:
        pass
