"""Trainer runs for tests: the tiny budget every event fits in, and the two ways to start one
(the real CLI in a fresh process, or `train()` in this one as the CLI calls it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from graft.train.config import CONFIGS, register_resolvers
from graft.train.loop import train

REPO = Path(__file__).resolve().parents[1]

# No logger, no progress bar, few log lines: runs whose budgets the test sets itself.
QUIET = ["logger=none", "trainer.progress=false", "trainer.log_every=5"]

# A few fast steps of the default cell (adam#sgd on digits) with every event exercised.
TINY = [
    "logger=none",
    "trainer.batch_size=16",
    "trainer.max_steps=6",
    "trainer.eval_every=3",
    "trainer.log_every=1",
    "trainer.log_norms_every=3",
    "trainer.checkpoint_every=2",
    "trainer.keep_checkpoints=2",
    "trainer.progress=false",
]


def graft_train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (as `python -m graft.train`), in the run's parent."""
    return subprocess.run(
        [sys.executable, "-m", "graft.train", *TINY, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def torchrun(run_dir: Path, *overrides: str, processes: int = 2) -> subprocess.Popen:
    """graft-train under torchrun with `processes` ranks (gloo on the CPU), in the run's
    parent; its output (both streams) on stdout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command.append(f"--nproc_per_node={processes}")
    command += ["-m", "graft.train", *QUIET, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=run_dir.parent
    )


def worker_pids(parent: int) -> list[int]:
    """The processes torchrun (`parent`) started: its ranks."""
    found = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def config(*overrides: str) -> dict:
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("train", [*TINY, *overrides]), resolve=True)


def train_in_process(run_dir: Path, *overrides: str) -> int:
    """train() as the CLI calls it, recording the config the way the CLI does."""
    cfg = config(*overrides)

    def record() -> None:
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        if not (run_dir / ".hydra" / "config.yaml").exists():
            OmegaConf.save(OmegaConf.create(cfg), run_dir / ".hydra" / "config.yaml")

    return train(cfg, run_dir, record)


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "train/samples_per_s"} for line in lines]


def relative_differences(a: Path, b: Path) -> dict[str, float]:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return {
        key: float((first[key] - second[key]).norm() / first[key].norm())
        for key in first
        if first[key].is_floating_point() and first[key].norm() > 0
    }
