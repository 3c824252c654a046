"""(d) of scripts/gpu_check.py: torchrun over the devices here, one rank killed, a resume.

A run on every GPU present (NCCL; on a CPU two gloo ranks) is started, one of its ranks is
sent SIGKILL once the first checkpoint is on disk, and the same command is run again: it
must say it resumes and end at the last step. Its final weights are compared with an
uninterrupted run's: float64 and no normalisation (`task=digits_resnet8`), so on a CPU the
two are bit for bit the same and on a GPU they differ by what nondeterministic kernels add.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from device_checks.checks import Check
from graft.train.checkpoints import saved_checkpoints

TOLERANCE = {"cpu": 0.0, "cuda": 1e-6}  # largest relative difference of a final weight
TIMEOUT_S = 300


def ranks_here(device: str) -> int:
    return torch.cuda.device_count() if device == "cuda" else 2


def command(run_dir: Path, device: str, steps: int) -> list[str]:
    ranks = ranks_here(device)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        "graft.train",
        "task=digits_resnet8",
        f"trainer.device={device}",
        f"trainer.backend={'nccl' if device == 'cuda' else 'gloo'}",
        "trainer.dtype=float64",
        f"trainer.batch_size={16 * ranks}",
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every={steps // 6}",
        "trainer.eval_every=0",
        f"trainer.log_every={steps // 6}",
        "trainer.timeout_s=60",
        "logger=none",
        "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
    ]


def start(run_dir: Path, device: str, steps: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command(run_dir, device, steps),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=run_dir.parent,
        env=env,
    )


def finish(job: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = job.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        job.kill()
        output, _ = job.communicate()
    return job.returncode, output


def kill_a_rank_after_the_first_checkpoint(job: subprocess.Popen, run_dir: Path) -> str:
    """SIGKILL to the last worker once a checkpoint is on disk; what happened, in words."""
    deadline = time.monotonic() + TIMEOUT_S
    while not saved_checkpoints(run_dir / "checkpoints"):
        if job.poll() is not None:
            return f"the job ended ({job.returncode}) before its first checkpoint"
        if time.monotonic() > deadline:
            return "no checkpoint within the time limit"
        time.sleep(0.02)
    found = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True)
    workers = [int(pid) for pid in found.stdout.split()]
    if not workers:
        return "no worker process to kill"
    os.kill(workers[-1], signal.SIGKILL)
    return ""


def largest_difference(a: Path, b: Path) -> float:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(
        float((first[key] - second[key]).norm() / first[key].norm().clamp_min(1e-300))
        for key in first
        if first[key].is_floating_point()
    )


def distributed_resume(device: str, say: Callable[[str], None]) -> list[Check]:
    steps = 60 if device == "cpu" else 600  # long enough that the kill lands mid-run
    ranks = ranks_here(device)
    case = f"{ranks} rank{'s' if ranks > 1 else ''}, {'NCCL' if device == 'cuda' else 'gloo'}"
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        whole, resumed = Path(scratch) / "uninterrupted", Path(scratch) / "resumed"
        started = time.perf_counter()
        code, output = finish(start(whole, device, steps))
        if code != 0:
            return [Check("distributed", case, None, None, False, last_line(output))]
        say(f"  uninterrupted: {time.perf_counter() - started:.0f} s")
        job = start(resumed, device, steps)
        problem = kill_a_rank_after_the_first_checkpoint(job, resumed)
        code, output = finish(job)
        killed = not problem and code != 0 and not (resumed / "summary.json").exists()
        checks = [
            Check(
                "distributed",
                f"{case}: a rank killed (SIGKILL) ends the job",
                None,
                None,
                killed,
                problem or f"exit code {code}",
            )
        ]
        if not killed:
            return checks
        code, output = finish(start(resumed, device, steps))
        resumed_from = [line for line in output.splitlines() if "resuming" in line]
        if code != 0 or not resumed_from:
            note = last_line(output) if code else "the rerun did not resume"
            return [
                *checks,
                Check("distributed", f"{case}: the rerun resumes", None, None, False, note),
            ]
        difference = largest_difference(whole, resumed)
        tolerance = TOLERANCE[device]
        step = resumed_from[0].rsplit(" from ", 1)[-1]  # "resuming <dir> from step N"
        note = f"resumed from {step}; {time.perf_counter() - started:.0f} s for the three runs"
        checks.append(
            Check(
                "distributed",
                f"{case}: the resumed run's weights against an uninterrupted run's",
                difference,
                tolerance,
                difference <= tolerance,
                note,
            )
        )
        return checks


def last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "no output"
