"""scripts/gpu_check.py as the device session will run it, here with `--device cpu --quick`:
every check passes and lands in its report, and its bad input is one line with exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from graft.tasks import build_task
from graft.train.checks import check_before_building
from graft.train.strict import check_config
from tests.runs import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"


def gpu_check(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.slow
@pytest.mark.compile
def test_the_quick_cpu_run_passes_every_check_and_writes_its_report(tmp_path):
    result = gpu_check("--device", "cpu", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert report == result.stdout
    assert "## (a) Correctness" in report and "## (b) Optimizer speed" in report
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    eager = [row for row in rows if row.startswith("| eager |")]
    assert len(eager) == 7 * 7 * 2  # every pair of built-in rules, both granularities
    compiled = [row for row in rows if row.startswith("| compiled |")]
    assert compiled and all("path whole" in row for row in compiled)  # the GPU's path
    assert not any("FAIL" in row for row in rows)
    speed = [row for row in rows if "Graft adam#sgd, compiled" in row]
    assert len(speed) == 2 and all("path native" in row for row in speed)  # two models
    # (c): both models, with and without graft.compile, a ratio from each of two rounds.
    throughput = section(report, "## (c) Trainer throughput")
    assert [row.split(" | ")[1] for row in throughput] == ["false", "true"] * 2
    assert all(re.search(r"\| \d+\.\d{3} \(\d+\.\d{3}, \d+\.\d{3}\) \|", row) for row in throughput)
    # (d): a killed rank ends the job; the rerun resumes to the uninterrupted run's weights.
    distributed = section(report, "## (d) Distributed")
    assert len(distributed) == 2 and all("| pass |" in row for row in distributed)
    assert "| 0.00e+00 |" in distributed[1] and "resumed from step" in distributed[1]


def section(report: str, heading: str) -> list[str]:
    """The table rows under `heading`, up to the next heading."""
    text = report.split(heading, 1)[1].split("\n## ", 1)[0]
    return [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_an_existing_report_is_refused_and_kept(tmp_path):
    (tmp_path / "gpu_check.md").write_text("an earlier report\n")
    result = gpu_check("--device", "cpu", "--quick", "--out", str(tmp_path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "gpu_check.md exists" in result.stderr and "allowed:" in result.stderr
    assert (tmp_path / "gpu_check.md").read_text() == "an earlier report\n"


def test_an_out_that_is_a_file_is_refused_before_the_run(tmp_path):
    (tmp_path / "out").write_text("a file\n")
    result = gpu_check("--device", "cpu", "--quick", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "is a file" in result.stderr
    assert (tmp_path / "out").read_text() == "a file\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_device_is_one_line_and_exit_code_2(tmp_path):
    result = gpu_check("--device", "cuda", "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu_check: --device cuda: no CUDA device is visible here; allowed: --device cpu"
    ]
    assert not (tmp_path / "gpu_check.md").exists()


@pytest.mark.parametrize("workload", ["ResNet-50, bf16, channels_last", "BERT-base, bf16"])
def test_the_full_runs_of_section_c_are_valid_configs_of_the_full_scale_tasks(
    workload, monkeypatch, tmp_path
):
    """What the device runs in (c) and the quick run does not: the full-scale configs on
    synthetic data pass graft-train's checks and build (here on the CPU)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from bench_trainer import config
    from device_checks.trainer_throughput import FULL, command_line

    overrides = command_line(FULL[workload], "cpu", compiled=True, warm_steps=10)
    cfg = config(overrides)
    check_config(overrides, cfg, sweeping=False)
    check_before_building(cfg)
    assert cfg["trainer"]["batch_size"] == 256 and cfg["trainer"]["bf16"]
    assert cfg["graft"]["compile"] and cfg["task"]["data"]["source"] == "synthetic"
    task = build_task(cfg["task"], seed=0, cache_dir=tmp_path)
    assert sum(p.numel() for p in task.model.parameters()) > 23_000_000
