"""graft-train with trainer.parallel=fsdp (graft/train/sharding.py) under torchrun on 2 gloo
ranks: the same run as one process, sharded checkpoints that a killed job resumes from bit
for bit, and BERT's layers sharded with its weights written as an unsharded run's."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.runs import metric_lines, torchrun, train_in_process, without_timing, worker_pids

pytestmark = pytest.mark.distributed

# No normalisation and float64: the 2-rank and 1-process runs differ by rounding alone.
EXACT = [
    "task=digits_resnet8",
    "trainer.dtype=float64",
    "trainer.batch_size=32",
    "trainer.eval_every=10",
    "trainer.log_every=5",
    "trainer.log_norms_every=10",
    "trainer.checkpoint_every=5",
    "trainer.keep_checkpoints=2",
]
FSDP = [*EXACT, "trainer.parallel=fsdp", "trainer.timeout_s=60"]
STEPS = "trainer.max_steps=30"


def finished(job, run_dir: Path) -> str:
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    return output


def kill_a_rank_after_the_first_checkpoint(run_dir: Path, overrides: list[str]) -> None:
    """Start the run on 2 ranks and SIGKILL one once step 5's checkpoint is written: the
    job ends, unfinished."""
    job = torchrun(run_dir, *overrides)
    first = run_dir / "checkpoints" / "step_00000005.pt"
    deadline = time.monotonic() + 120
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.exists(), job.communicate(timeout=60)[0][-3000:]
    os.kill(worker_pids(job.pid)[-1], signal.SIGKILL)
    job.communicate(timeout=120)
    assert job.returncode != 0 and not (run_dir / "summary.json").exists()


@pytest.fixture(scope="module")
def fsdp_run(module_tmp) -> Path:
    run_dir = module_tmp / "fsdp"
    # Two micro-batches per rank: FSDP2 reduce-scatters on the last one only.
    finished(torchrun(run_dir, *FSDP, STEPS, "trainer.micro_batch_size=8"), run_dir)
    return run_dir


def test_two_fsdp_ranks_equal_one_process_weights_norms_and_metrics(fsdp_run, tmp_path):
    one = tmp_path / "one"
    assert train_in_process(one, *EXACT, STEPS) == 0
    sharded, whole = load_file(fsdp_run / "model.safetensors"), load_file(one / "model.safetensors")
    assert sharded.keys() == whole.keys()
    for key, tensor in whole.items():
        assert ((sharded[key] - tensor).norm() / tensor.norm()).item() <= 1e-10, key
    fsdp_lines, one_lines = (
        without_timing(metric_lines(fsdp_run)),
        without_timing(metric_lines(one)),
    )
    assert [line["step"] for line in fsdp_lines] == [line["step"] for line in one_lines]
    for found, expected in zip(fsdp_lines, one_lines):
        assert found.keys() == expected.keys()  # norms/magnitude/<name> for every tensor
        for key, value in expected.items():
            if key == "train/epoch":  # counted in micro-batches, of which an epoch trims more
                continue
            # Losses and evaluation logits are float32 (the split changes their rounding);
            # the norms are the float64 step's.
            rel = 1e-9 if key.startswith("norms/") else 1e-6
            assert found[key] == pytest.approx(value, rel=rel, abs=1e-12), (found["step"], key)
    # Each rank holds half of both optimizers' states.
    states = [json.loads((run / "summary.json").read_text()) for run in (fsdp_run, one)]
    halves = states[0]["optimizer_state_bytes"] / states[1]["optimizer_state_bytes"]
    assert 0.45 < halves < 0.55


def test_a_sharded_checkpoint_is_a_file_and_its_shards_and_old_ones_go_together(fsdp_run):
    names = sorted(path.name for path in (fsdp_run / "checkpoints").iterdir())
    assert names == [
        "step_00000025.dcp",
        "step_00000025.pt",
        "step_00000030.dcp",
        "step_00000030.pt",
    ]
    checkpoint = torch.load(fsdp_run / "checkpoints/step_00000030.pt", weights_only=True)
    assert checkpoint["shards"] == "step_00000030.dcp"
    assert "model" not in checkpoint and "optimizer" not in checkpoint  # in the shards


def test_a_killed_fsdp_rank_ends_the_job_and_the_rerun_resumes_bit_for_bit(fsdp_run, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*FSDP, STEPS, "trainer.micro_batch_size=8"]
    kill_a_rank_after_the_first_checkpoint(run_dir, overrides)

    output = finished(torchrun(run_dir, *overrides), run_dir)
    assert "resuming" in output
    resumed, uninterrupted = (load_file(run / "model.safetensors") for run in (run_dir, fsdp_run))
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted)
    assert without_timing(metric_lines(run_dir)) == without_timing(metric_lines(fsdp_run))


def test_fsdp_shards_bert_layers_and_writes_the_weights_an_unsharded_run_writes(tmp_path):
    """Tied weights (the decoder is the word embedding) are saved under one name, as
    safetensors' save_model names them for an unsharded model."""
    bert = [
        "task=tiny_bert",
        "trainer.batch_size=8",
        "trainer.max_steps=2",
        "schedule.warmup_steps=1",
        "trainer.eval_every=2",
    ]
    run_dir = tmp_path / "fsdp"
    finished(torchrun(run_dir, *bert, "trainer.parallel=fsdp"), run_dir)
    one = tmp_path / "one"
    assert train_in_process(one, *bert) == 0
    sharded, whole = load_file(run_dir / "model.safetensors"), load_file(one / "model.safetensors")
    assert sharded.keys() == whole.keys()
    assert all(sharded[key].shape == whole[key].shape for key in whole)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and 0 <= summary["eval/accuracy"] <= 1


def test_a_sharded_checkpoint_resumes_in_one_process_at_the_same_sample(fsdp_run, tmp_path, caplog):
    """torch.distributed.checkpoint reshards on load, and the data goes on at the same
    global batch: a 2-rank run killed mid-way ends in one process as it would have on 2."""
    run_dir = tmp_path / "run"
    overrides = [*FSDP, STEPS, "trainer.micro_batch_size=8"]
    kill_a_rank_after_the_first_checkpoint(run_dir, overrides)
    with caplog.at_level("WARNING"):
        assert train_in_process(run_dir, *overrides) == 0
    assert "resuming a checkpoint of 2 ranks with 1" in caplog.text
    resumed, uninterrupted = (load_file(run / "model.safetensors") for run in (run_dir, fsdp_run))
    for key, tensor in uninterrupted.items():
        assert ((resumed[key] - tensor).norm() / tensor.norm()).item() <= 1e-10, key
