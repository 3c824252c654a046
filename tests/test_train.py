"""The trainer end to end on the digits task: run directory, resume, refusals, failures."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.runs import (
    TINY,
    graft_train,
    metric_lines,
    train_in_process,
    without_timing,
)


@pytest.fixture(scope="module")
def finished_run(module_tmp) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = module_tmp / "run"
    return run_dir, graft_train(run_dir)


@pytest.mark.slow
def test_cli_run_writes_the_run_directory(finished_run):
    run_dir, result = finished_run
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_00000004.pt",
        "step_00000006.pt",
    ]
    lines = metric_lines(run_dir)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert all({"train/loss", "train/lr", "train/samples_per_s"} <= line.keys() for line in lines)
    evaluated = [line["step"] for line in lines if "eval/top1" in line]
    assert evaluated == [3, 6]
    norms = lines[2]
    assert norms["norms/magnitude/fc.weight"] > 0 and norms["norms/direction/fc.weight"] > 0
    assert "norms/magnitude/layer1.0.conv1.weight" in norms


@pytest.mark.slow
def test_summary_and_final_weights(finished_run):
    run_dir, _ = finished_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert summary["cell"] == "adam#sgd" and summary["task"] == "digits_resnet"
    last = metric_lines(run_dir)[-1]
    assert summary["eval/top1"] == last["eval/top1"] and summary["eval/top5"] == last["eval/top5"]
    for key in ("wall_seconds", "samples_per_s", "optimizer_state_bytes", "versions", "git_sha"):
        assert key in summary
    weights = load_file(run_dir / "model.safetensors")
    checkpoint = torch.load(run_dir / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert weights.keys() == checkpoint["model"].keys()
    assert all(torch.equal(weights[k], checkpoint["model"][k]) for k in weights)
    # Adam's two moments plus SGD's momentum, fp32: 3 x 4 bytes per parameter.
    assert summary["optimizer_state_bytes"] == 12 * summary["parameters"] + 4 * len(
        [k for k in weights if not k.endswith(("running_mean", "running_var", "batches_tracked"))]
    )


@pytest.mark.slow
def test_a_finished_run_is_a_no_op(finished_run):
    run_dir, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    result = graft_train(run_dir)
    assert result.returncode == 0
    assert "already finished at step 6: nothing to do" in result.stdout + result.stderr
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != "train.log"} == {
        p: t for p, t in before.items() if p.name != "train.log"
    }


@pytest.mark.slow
def test_another_config_in_the_same_folder_is_refused(finished_run):
    run_dir, _ = finished_run
    recorded = (run_dir / ".hydra" / "config.yaml").read_text()
    (run_dir / "summary.json").rename(run_dir / "summary.json.kept")
    try:
        result = graft_train(run_dir, "magnitude.lr=0.5", "trainer.seed=3")
    finally:
        (run_dir / "summary.json.kept").rename(run_dir / "summary.json")
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()
    assert len(message) == 1, result.stderr
    assert "magnitude.lr: 0.001 -> 0.5" in message[0] and "trainer.seed: 0 -> 3" in message[0]
    assert "hydra.run.dir" in message[0]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == recorded


def interrupted_at(run_dir: Path, step: int) -> None:
    """Leave run_dir as a run killed right after its checkpoint of `step` would leave it."""
    for checkpoint in (run_dir / "checkpoints").glob("step_*.pt"):
        if int(checkpoint.stem.split("_")[1]) > step:
            checkpoint.unlink()
    (run_dir / "summary.json").unlink()
    (run_dir / "model.safetensors").unlink()


@pytest.mark.slow
def test_resume_reaches_the_uninterrupted_weights_bit_for_bit(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    overrides = ("trainer.max_steps=8", "trainer.keep_checkpoints=4")
    assert train_in_process(uninterrupted, *overrides) == 0
    assert train_in_process(resumed, *overrides) == 0
    interrupted_at(resumed, 4)
    # A torn last metrics line and lines after the checkpoint, as a kill would leave them.
    with open(resumed / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 9, "train/lo')
    assert train_in_process(resumed, *overrides) == 0
    assert f"resuming {resumed} from step 4" in caplog.text
    expected = load_file(uninterrupted / "model.safetensors")
    actual = load_file(resumed / "model.safetensors")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert without_timing(metric_lines(resumed)) == without_timing(metric_lines(uninterrupted))


@pytest.mark.slow
def test_a_resume_between_two_log_lines_logs_the_same_losses(tmp_path):
    """Checkpoints at steps 2 and 4, log lines at 3 and 6: the losses of the steps since the
    last log line go into the checkpoint, so the resumed run's mean over 4..6 is the same."""
    overrides = ("trainer.max_steps=6", "trainer.log_every=3", "trainer.keep_checkpoints=4")
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    assert train_in_process(uninterrupted, *overrides) == 0
    assert train_in_process(resumed, *overrides) == 0
    interrupted_at(resumed, 4)
    assert train_in_process(resumed, *overrides) == 0
    assert without_timing(metric_lines(resumed)) == without_timing(metric_lines(uninterrupted))


@pytest.mark.slow
def test_masked_lm_resume_restores_dropout_and_masking_rng_bit_for_bit(tmp_path, caplog):
    """tiny_bert draws dropout and its training masks from the global RNG: the checkpoint's."""
    caplog.set_level(logging.INFO)
    overrides = (
        "task=tiny_bert",
        "trainer.batch_size=4",
        "trainer.max_steps=6",
        "trainer.keep_checkpoints=4",
        "trainer.eval_batch_size=64",
        "schedule.warmup_steps=2",
        f"cache_dir={tmp_path / 'cache'}",
    )
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    assert train_in_process(uninterrupted, *overrides) == 0
    uninterrupted_weights = load_file(uninterrupted / "model.safetensors")
    assert train_in_process(resumed, *overrides) == 0
    interrupted_at(resumed, 2)
    assert train_in_process(resumed, *overrides) == 0
    assert f"resuming {resumed} from step 2" in caplog.text
    # Evaluating more often draws nothing from the RNG: the same weights again.
    assert train_in_process(tmp_path / "evaluated", *overrides, "trainer.eval_every=1") == 0
    evaluated = load_file(tmp_path / "evaluated" / "model.safetensors")
    assert all(torch.equal(evaluated[key], uninterrupted_weights[key]) for key in evaluated)
    expected = load_file(uninterrupted / "model.safetensors")
    actual = load_file(resumed / "model.safetensors")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    lines = without_timing(metric_lines(resumed))
    assert lines == without_timing(metric_lines(uninterrupted))
    assert 0 < lines[-1]["eval/accuracy"] < 1 and lines[-1]["eval/loss"] > 0


@pytest.mark.slow
def test_bf16_channels_last_and_compile_switches(tmp_path):
    """All three at once on the CPU (torch.compile needs a C++ compiler: about 30 s here)."""
    switches = ("trainer.bf16=true", "trainer.channels_last=true", "trainer.compile=true")
    assert train_in_process(tmp_path / "run", *switches, "trainer.max_steps=2") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and 0 <= summary["eval/top1"] <= 1
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert "conv1.weight" in weights  # the model's own names, not the compiled wrapper's


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    assert train_in_process(uninterrupted, "trainer.keep_checkpoints=3") == 0
    assert train_in_process(resumed, "trainer.keep_checkpoints=3") == 0
    interrupted_at(resumed, 4)
    (resumed / "checkpoints" / "step_00000004.pt").write_bytes(b"not a checkpoint")
    assert train_in_process(resumed, "trainer.keep_checkpoints=3") == 0
    assert (
        "step_00000004.pt is unreadable" in caplog.text and "trying the one before" in caplog.text
    )
    assert f"resuming {resumed} from step 2" in caplog.text
    expected = load_file(uninterrupted / "model.safetensors")
    actual = load_file(resumed / "model.safetensors")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


@pytest.mark.slow
def test_weights_that_overflow_are_never_saved(tmp_path):
    """One step to inf weights with a finite loss before it: diverged, nothing saved."""
    run_dir = tmp_path / "run"
    overrides = ["optim@magnitude=sgd", "magnitude.lr=3e38", "graft=off", "trainer.max_steps=1"]
    result = graft_train(run_dir, *overrides, "trainer.checkpoint_every=1")
    assert result.returncode == 1
    assert "non-finite weights at step 1" in result.stdout + result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"
    assert not (run_dir / "model.safetensors").exists()
    assert not list((run_dir / "checkpoints").glob("*.pt"))


@pytest.mark.slow
def test_a_bad_wandb_mode_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "sometimes"}
    command = [sys.executable, "-m", "graft.train", *TINY[1:], f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "WANDB_MODE='sometimes' is not a W&B mode" in result.stderr
    assert not (run_dir / ".hydra").exists() and not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = graft_train(run_dir, "optim@magnitude=sgd", "magnitude.lr=1e30", "graft=off")
    assert result.returncode == 1
    assert "non-finite training loss at step" in result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["failed_step"] >= 2
    assert not (run_dir / "model.safetensors").exists()
    for path in (run_dir / "checkpoints").glob("step_*.pt"):
        state = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
        assert int(path.stem.split("_")[1]) < summary["failed_step"]


@pytest.mark.slow
def test_default_run_directory_is_stable_per_config(tmp_path):
    def run(*overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "graft.train", "logger=none", "trainer.progress=false"]
        return subprocess.run(
            [*command, "trainer.max_steps=1", "trainer.batch_size=8", *overrides],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert run().returncode == 0
    assert run("optim@direction=adagrad", "trainer.seed=1").returncode == 0
    cell = tmp_path / "outputs" / "digits_resnet" / "adam#sgd" / "seed0"
    assert (cell / "trainer.batch_size=8,trainer.max_steps=1" / "summary.json").exists()
    other = tmp_path / "outputs" / "digits_resnet" / "adam#adagrad" / "seed1"
    assert (other / "trainer.batch_size=8,trainer.max_steps=1" / "summary.json").exists()
    again = run()
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr


@pytest.mark.slow
def test_a_sweep_puts_each_job_where_its_single_run_would_be(tmp_path):
    command = [sys.executable, "-m", "graft.train", "-m", "optim@magnitude=sgd,adam"]
    command += ["logger=none", "trainer.progress=false", "trainer.max_steps=1"]
    sweep = lambda: subprocess.run(  # noqa: E731
        [*command, "trainer.batch_size=8"], cwd=tmp_path, capture_output=True, text=True
    )
    assert sweep().returncode == 0
    for cell in ("sgd#sgd", "adam#sgd"):
        run_dir = tmp_path / "outputs/digits_resnet" / cell / "seed0"
        summary = run_dir / "trainer.batch_size=8,trainer.max_steps=1" / "summary.json"
        assert json.loads(summary.read_text())["cell"] == cell
    again = sweep()
    assert again.returncode == 0
    assert (again.stdout + again.stderr).count("nothing to do") == 2
