"""Data parallelism on the CPU (gloo): DDP = one process, accumulation = one batch, a dead rank
ends the job, fp16 overflow skips the grafted step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from graft import Graft
from graft.common.errors import UserError
from tests.runs import QUIET, relative_differences, torchrun, train_in_process, worker_pids

pytestmark = pytest.mark.distributed

# GroupNorm: the gradient does not depend on how the batch is split; fp64: no rounding drift.
EXACT = ["task.model.norm=group", "trainer.dtype=float64", "trainer.eval_every=0"]


def test_two_ranks_at_half_batch_equal_one_process_at_the_full_batch(tmp_path):
    overrides = [*EXACT, "trainer.batch_size=16", "trainer.max_steps=20"]
    overrides.append("trainer.checkpoint_every=10")
    job = torchrun(tmp_path / "two_ranks", *overrides)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output
    assert train_in_process(tmp_path / "one_process", *overrides) == 0
    differences = relative_differences(tmp_path / "one_process", tmp_path / "two_ranks")
    assert max(differences.values()) < 1e-6, max(differences.items(), key=lambda kv: kv[1])
    # Rank 0 alone wrote the run's files: one line per logged step.
    steps = [json.loads(line)["step"] for line in (tmp_path / "two_ranks/metrics.jsonl").open()]
    assert steps == [5, 10, 15, 20]

    # Resumed from step 10 with the same two ranks: the same weights, bit for bit.
    (tmp_path / "resumed").mkdir()
    for item in (".hydra", "checkpoints"):
        shutil.copytree(tmp_path / "two_ranks" / item, tmp_path / "resumed" / item)
    (tmp_path / "resumed/checkpoints/step_00000020.pt").unlink()
    job = torchrun(tmp_path / "resumed", *overrides)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0 and "resuming" in output, output
    assert set(relative_differences(tmp_path / "two_ranks", tmp_path / "resumed").values()) == {0}

    # One process cannot take over two ranks' data positions and RNG streams.
    (tmp_path / "resumed/summary.json").unlink()
    (tmp_path / "resumed/checkpoints/step_00000020.pt").unlink()
    with pytest.raises(UserError, match="by 2 ranks and this run has 1; resume with 2"):
        train_in_process(tmp_path / "resumed", *overrides)


def test_accumulation_of_two_half_batches_equals_one_batch(tmp_path):
    overrides = [*EXACT, *QUIET, "trainer.batch_size=16", "trainer.max_steps=20"]
    assert train_in_process(tmp_path / "one_batch", *overrides) == 0
    assert train_in_process(tmp_path / "accumulated", *overrides, "trainer.micro_batch_size=8") == 0
    differences = relative_differences(tmp_path / "one_batch", tmp_path / "accumulated")
    assert max(differences.values()) < 1e-6


def grafted_norms_on_rank(rank: int, world_size: int, results: Path) -> None:
    """One DDP rank: a few adam#sgd steps on its own data; saves its last norms."""
    # A file rendezvous: no port that another test or job could hold.
    store = f"file://{results / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    )
    optimizer = Graft(model.parameters(), {"name": "adam", "lr": 1e-2}, {"name": "sgd", "lr": 0.1})
    data = torch.Generator().manual_seed(100 + rank)  # each rank sees different samples
    for _ in range(3):
        model(torch.randn(4, 6, generator=data)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    norms = optimizer.last_norms
    torch.save({"magnitude": norms.magnitude, "direction": norms.direction}, results / f"{rank}.pt")
    # Without it a rank can close its gloo pairs while the other still uses them (SIGABRT).
    dist.barrier()
    dist.destroy_process_group()


def test_every_rank_computes_the_same_grafting_norms(tmp_path):
    """DDP averages gradients before Graft sees them, so no rank needs another's norms."""
    mp.spawn(grafted_norms_on_rank, args=(2, tmp_path), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    assert torch.equal(rank0["magnitude"], rank1["magnitude"])
    assert torch.equal(rank0["direction"], rank1["direction"])
    assert not torch.equal(rank0["magnitude"], rank0["direction"])


def test_a_killed_rank_ends_the_job_promptly_and_a_rerun_resumes(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["trainer.batch_size=8", "trainer.max_steps=100", "trainer.checkpoint_every=5"]
    overrides += ["trainer.eval_every=0", "trainer.timeout_s=30"]
    job = torchrun(run_dir, *overrides)
    first_checkpoint = run_dir / "checkpoints" / "step_00000005.pt"
    deadline = time.monotonic() + 120
    while not first_checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first_checkpoint.exists(), job.communicate(timeout=60)[0]
    workers = worker_pids(job.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    killed_at = time.monotonic()
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - killed_at < 60
    assert "SIGKILL" in output or "Signal 9" in output, output[-2000:]
    assert not (run_dir / "summary.json").exists()

    rerun = torchrun(run_dir, *overrides)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output[-3000:]
    assert "resuming" in output
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 100


def test_fp16_overflow_skips_the_step_and_leaves_both_states_untouched():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = Graft(model.parameters(), {"name": "adam", "lr": 1e-2}, {"name": "sgd", "lr": 0.1})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def step(inject_inf: bool) -> None:
        loss = model(torch.randn(8, 4)).square().mean()
        scaler.scale(loss).backward()
        if inject_inf:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)  # unscales first: Graft would measure true gradients
        scaler.update()
        optimizer.zero_grad()

    step(inject_inf=False)
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for p in model.parameters() for k, v in flat_state(optimizer, p)}
    scale = scaler.get_scale()
    step(inject_inf=True)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    after = {k: v for p in model.parameters() for k, v in flat_state(optimizer, p)}
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert scaler.get_scale() == scale / 2  # the scale backs off
    step(inject_inf=False)
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def flat_state(optimizer: Graft, param: torch.Tensor):
    for side in ("magnitude", "direction"):
        for key, value in optimizer.state[param][side].items():
            yield f"{id(param)}/{side}/{key}", value


@pytest.mark.parametrize("precision", ["trainer.fp16=true", "trainer.bf16=true"])
def test_the_trainer_runs_in_mixed_precision(tmp_path, precision):
    assert train_in_process(tmp_path / "run", precision, "trainer.max_steps=3") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 3


def test_the_submitit_launcher_runs_one_cell_as_a_two_rank_job(tmp_path):
    """hydra-submitit-launcher's local executor, as its Slurm one would: ranks from its env."""
    command = [sys.executable, "-m", "graft.train", "-m", "hydra/launcher=submitit_local"]
    command += ["hydra.launcher.tasks_per_node=2", *QUIET, "trainer.max_steps=4"]
    command += ["trainer.batch_size=8", "trainer.eval_every=0"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    logs = "".join(path.read_text() for path in tmp_path.glob("outputs/.submitit/*/*_log.out"))
    assert "rank 0 of 2 (gloo)" in logs and "rank 1 of 2 (gloo)" in logs
    summaries = list(tmp_path.glob("outputs/digits_resnet/adam#sgd/seed0/*/summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["steps"] == 4


def test_the_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from graft.train.config import CONFIGS, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
