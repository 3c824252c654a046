"""The trainer's parts alone: data order, batch split, checkpoints, config checks, W&B mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from graft.common.errors import UserError
from graft.train.checkpoints import load_newest_checkpoint, save_checkpoint, saved_checkpoints
from graft.train.checks import split_batch
from graft.train.cli import check_overrides
from graft.train.config import config_differences
from graft.train.data import BatchStream, EpochSampler
from graft.train.metrics import MetricsLog, wandb_mode
from graft.train.stopwatch import Stopwatch


def labels_of(stream: BatchStream, count: int) -> list[list[int]]:
    return [next(stream)[0].tolist() for _ in range(count)]


def test_stream_is_a_seeded_permutation_per_epoch_and_resumes_mid_epoch():
    data = TensorDataset(torch.arange(10))
    stream = BatchStream(data, 3, seed=7, collate=None)
    first = labels_of(stream, 7)  # 3 batches per epoch: crosses two epoch boundaries
    epoch0 = sum(first[:3], [])
    assert len(set(epoch0)) == 9 and set(epoch0) <= set(range(10))  # the tail of 1 is dropped
    assert sum(first[3:6], []) != epoch0  # a fresh permutation every epoch
    state = BatchStream(data, 3, seed=7, collate=None)
    labels_of(state, 4)
    resumed = BatchStream(data, 3, seed=7, collate=None)
    resumed.load_state_dict(state.state_dict())
    assert resumed.state_dict() == {"epoch": 1, "position": 1, "epoch_samples": 3}
    assert labels_of(resumed, 3) == first[4:7]
    # Another split of the same samples (a sharded run resumed on other ranks or
    # micro-batches) goes on at the same sample: here 3 items as 1 + 2 read as batches of 1.
    ones = BatchStream(data, 1, seed=7, collate=None)
    ones.load_state_dict(state.state_dict())
    assert ones.state_dict()["position"] == 3
    assert labels_of(ones, 3) == [[item] for item in first[4]]
    assert labels_of(BatchStream(data, 3, seed=8, collate=None), 3) != first[:3]


def test_ranks_read_disjoint_shares_of_the_same_permutation():
    shares = [list(EpochSampler(10, 2, seed=0, epoch=0, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 4 and not set(shares[0]) & set(shares[1])
    whole = list(EpochSampler(10, 2, seed=0, epoch=0))
    assert sorted(shares[0] + shares[1]) == sorted(whole[:8])


@pytest.mark.parametrize(
    ("batch", "micro", "world", "expected"),
    [(128, None, 1, (128, 1)), (128, 32, 1, (32, 4)), (4096, 64, 8, (64, 8))],
)
def test_global_batch_splits_into_micro_batches_ranks_and_accumulation(
    batch, micro, world, expected
):
    assert split_batch(batch, micro, world) == expected


def test_a_batch_that_does_not_split_is_refused():
    with pytest.raises(UserError, match="trainer.batch_size=10 does not split over 4 ranks"):
        split_batch(10, None, 4)
    with pytest.raises(UserError, match="trainer.micro_batch_size=3 does not divide"):
        split_batch(16, 3, 1)


def test_checkpoints_keep_the_newest_and_skip_unreadable_ones(tmp_path, caplog):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), step)}, keep=3)
    assert [path.name for path in saved_checkpoints(tmp_path)] == [
        "step_00000002.pt",
        "step_00000003.pt",
        "step_00000004.pt",
    ]
    assert not list(tmp_path.glob("*.tmp"))  # written to a temporary name, then renamed
    assert load_newest_checkpoint(tmp_path)["step"] == 4
    (tmp_path / "step_00000004.pt").write_bytes(b"\x00" * 10)
    (tmp_path / "step_00000003.pt").write_bytes(b"")
    assert load_newest_checkpoint(tmp_path)["step"] == 2
    assert "step_00000004.pt is unreadable" in caplog.text
    assert load_newest_checkpoint(tmp_path / "nothing") is None
    (tmp_path / "step_00000002.pt").write_bytes(b"PK")
    with pytest.raises(UserError, match=r"step_00000004.pt is unreadable and no older checkpoint"):
        load_newest_checkpoint(tmp_path)


def test_config_differences_ignore_what_a_resume_may_change():
    recorded = {"magnitude": {"lr": 0.1}, "logger": {"name": "wandb"}, "trainer": {"seed": 0}}
    current = {
        "magnitude": {"lr": 0.2},
        "logger": {"name": "none"},
        "trainer": {"seed": 0, "progress": False},
    }
    assert config_differences(recorded, current) == ["magnitude.lr: 0.1 -> 0.2"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim@direction=sgd,adamz"], "unknown optim@direction option 'adamz'"),
        (["graft=layerwise"], "'layerwise' in graft=layerwise; allowed: global, off, tensor"),
        (["logger=tensorboard"], "allowed: none, wandb"),
        (["trainer.max_steps=="], "bad override"),
        (["+trainer.nonsense=1", "trainer.max_step=3"], "Could not override 'trainer.max_step'"),
    ],
)
def test_command_line_mistakes_are_caught_before_a_run_starts(overrides, message):
    with pytest.raises(UserError) as error:
        check_overrides(overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_sweeps_over_known_options_pass():
    check_overrides(["optim@magnitude=sgd,adam,adagrad", "graft=tensor,global"], compose_too=False)


def test_wandb_mode(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setattr("graft.train.metrics.unreachable", lambda url: None)  # the host answers
    auto = {"name": "wandb", "mode": "auto"}
    assert wandb_mode({"name": "none"}) is None
    assert wandb_mode(auto) == ("offline", "no credentials found")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(auto) == ("online", "credentials found")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(auto) == ("offline", "WANDB_MODE=offline")
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(UserError, match="WANDB_MODE='sometimes' is not a W&B mode"):
        wandb_mode(auto)


@pytest.mark.slow
def test_metrics_go_to_jsonl_and_an_offline_wandb_run(tmp_path):
    """W&B for real, offline: the run's files land in run_dir/wandb with our metrics."""
    script = f"""
import json, logging, pathlib
logging.basicConfig(level=logging.INFO)
from graft.train.metrics import MetricsLog
run_dir = pathlib.Path({str(tmp_path)!r})
log = MetricsLog(run_dir, resume_step=0, logger={{"name": "wandb", "mode": "offline",
    "project": "graft-test", "entity": None, "group": "g", "tags": ["t"]}},
    config={{"a": 1}}, run_name="adam#sgd seed0", wandb_id=None)
log.log(1, {{"train/loss": 2.5}})
log.close({{"eval/top1": 0.9}})
print("ID", log.wandb_id)
"""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "W&B: offline (logger.mode=offline)" in result.stderr
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 2.5}
    run_id = result.stdout.split("ID ")[1].strip()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))


def test_a_resumed_log_drops_lines_after_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"step": 4, "a'
    )
    log = MetricsLog(
        tmp_path, resume_step=2, logger={"name": "none"}, config={}, run_name="x", wandb_id=None
    )
    log.log(3, {"a": 30})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "a": 1},
        {"step": 2, "a": 2},
        {"step": 3, "a": 30},
    ]


def test_the_stopwatch_counts_steps_not_pauses_and_carries_over_a_resume(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("graft.train.stopwatch.time.perf_counter", lambda: now[0])
    watch = Stopwatch()  # the session starts at 100
    watch.load_state_dict({"train_seconds": 5.0, "wall_seconds": 50.0})  # earlier sessions
    now[0] = 110.0  # setup is wall time, not training time
    watch.start(samples=64)
    now[0] = 112.0
    assert watch.samples_per_s(samples=96) == 16.0  # 32 samples in 2 training seconds
    with watch.paused():  # an evaluation
        now[0] = 130.0
    now[0] = 131.0
    assert watch.samples_per_s(samples=112) == 16.0  # the pause is not in the window
    watch.stop()
    now[0] = 140.0
    assert watch.state_dict() == {"train_seconds": 5.0 + 3.0, "wall_seconds": 50.0 + 40.0}
