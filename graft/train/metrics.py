"""Where metrics go: `metrics.jsonl` (the source of truth) and, when on, Weights & Biases.

Every line of metrics.jsonl is one JSON object with `step` and metric keys (`train/loss`,
`eval/top1`, `norms/magnitude/<parameter>` ...). A resumed run first drops the lines written
after its checkpoint, so the file always reads as one uninterrupted run; the W&B run then gets
again the rows up to the checkpoint that a kill kept from its earlier segments (log_missing).
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

from graft.common.errors import UserError
from graft.common.network import unreachable
from graft.common.run_dir import METRICS
from graft.train.checkpoints import write_atomically
from graft.train.wandb_history import history_rows, run_logs

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline")
UNREACHABLE = "credentials found, but W&B is unreachable"  # starts the why of a fallback


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


def wandb_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def wandb_mode(logger: Mapping[str, Any]) -> tuple[str, str] | None:
    """(online or offline, why), or None with W&B off. WANDB_MODE wins over logger.mode.

    Online is only chosen when the W&B host (WANDB_BASE_URL, or the HTTPS proxy) answers within
    a few seconds: auto then falls back to offline, saying why; an explicit online is refused
    (UserError). Without this, W&B on a node with no network retries for ~2 minutes and dies.
    """
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
    if mode == "offline":
        return mode, f"{source}={mode}"
    if mode == "auto" and not has_wandb_credentials():
        return "offline", "no credentials found"
    down = unreachable(wandb_url())
    if down is None:
        return "online", "credentials found" if mode == "auto" else f"{source}={mode}"
    if mode == "auto":
        return "offline", f"{UNREACHABLE}: {down}; set WANDB_MODE=offline to skip this check"
    raise UserError(
        f"{source}=online but W&B is unreachable ({down}); on a node without network set "
        "WANDB_MODE=offline and upload later with `wandb sync <run>/wandb`, or use "
        "logger.mode=auto to fall back to offline"
    )


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
        self.path = run_dir / METRICS
        kept = [line for line in read_metrics(self.path) if line["step"] <= resume_step]
        write_atomically(
            self.path, lambda temporary: temporary.write_text("".join(map(to_line, kept)))
        )
        self.file = open(self.path, "a")  # noqa: SIM115 - open for the whole run
        self.wandb_run = None
        self.wandb_id = wandb_id
        mode = wandb_mode(logger)
        if mode is not None:
            earlier = run_logs(run_dir / "wandb", wandb_id) if wandb_id else []
            self.wandb_run = start_wandb(run_dir, *mode, logger, config, run_name, wandb_id)
            self.wandb_id = self.wandb_run.id
            self.log_missing(kept, earlier)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.file.write(to_line({"step": step, **metrics}))
        self.file.flush()
        if self.wandb_run is not None:
            # commit: hand the row over now, not when the next step's row arrives
            self.wandb_run.log(dict(metrics), step=step, commit=True)

    def log_missing(self, kept: list[dict[str, Any]], earlier: list[Path]) -> None:
        """Log again the kept metrics.jsonl rows that no earlier segment of the W&B run holds.

        W&B writes a run's rows from its own service process, which a kill -9 of the trainer
        takes down with rows still unwritten (the last seconds' train and eval rows). Those
        rows are in metrics.jsonl, so each resume decodes what the earlier segments' `.wandb`
        files actually hold and logs the difference into the new segment: after a resume the
        W&B history holds every row of metrics.jsonl.
        """
        recorded: dict[int, set[str]] = {}
        for path in earlier:
            for step, row in history_rows(path).items():
                recorded.setdefault(step, set()).update(row)
        # Online, W&B drops rows below the step the server resumed at: those it holds already.
        first = getattr(self.wandb_run, "starting_step", 0) or 0
        missing = [
            row
            for row in kept
            if row["step"] >= first
            and not set(row).difference({"step"}) <= recorded.get(row["step"], set())
        ]
        for row in missing:
            metrics = {key: value for key, value in row.items() if key != "step"}
            self.wandb_run.log(metrics, step=row["step"], commit=True)
        if missing:
            log.info(
                "W&B: logged again %d row(s) of metrics.jsonl (steps %d-%d) that the run's "
                "earlier segments lack (lost when the last job was killed)",
                len(missing),
                missing[0]["step"],
                missing[-1]["step"],
            )

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
        level = logging.WARNING if why.startswith(UNREACHABLE) else logging.INFO
        log.log(level, "W&B: offline (%s); upload later with `wandb sync %s/wandb`", why, run_dir)
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
