"""Throughput of graft-train against a bare hand-written loop, interleaved in one run.

Both sides train the same model on the same data with the same optimizer (the config's
M#D Graft and its schedule) for the same number of steps, alternating A/B then B/A each round so
drift on a shared machine hits both alike. graft-train's figure is its own
`samples_per_s` (summary.json: training steps with data loading, logging and norm logging
included; evaluation and checkpoints excluded); the bare loop's is steps x batch over its
timed loop. Run: `python scripts/bench_trainer.py [--rounds 4] [--steps 40]`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from graft.common.run_dir import read_summary
from graft.tasks import build_task
from graft.train.config import CONFIGS, register_resolvers
from graft.train.loop import train
from graft.train.optimizer import build_optimizer
from graft.train.setup import make_scheduler

TASKS = {
    "digits_resnet": ["task=digits_resnet"],
    "tiny_bert": ["task=tiny_bert"],
}


def config(task_overrides: list[str], steps: int) -> dict:
    register_resolvers()
    overrides = [
        *task_overrides,
        "logger=none",
        f"trainer.max_steps={steps}",
        "trainer.eval_every=0",  # one evaluation, at the end (excluded from samples/s)
        "trainer.checkpoint_every=0",
        "schedule.warmup_steps=0",  # any step count; the schedule's cost does not change
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides), resolve=True)


def graft_train_rate(cfg: dict) -> float:
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stderr(io.StringIO()):
        assert train(cfg, Path(run_dir)) == 0
        return read_summary(Path(run_dir))["samples_per_s"]


def bare_loop_rate(cfg: dict) -> float:
    """The loop one would write by hand: shuffle, forward, backward, step, schedule."""
    trainer = cfg["trainer"]
    torch.manual_seed(trainer["seed"])
    task = build_task(cfg["task"], seed=trainer["seed"], cache_dir=Path(cfg["cache_dir"]))
    model = task.model
    optimizer = build_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg["schedule"], trainer["max_steps"])
    batches = DataLoader(
        task.train_set,
        batch_size=trainer["batch_size"],
        shuffle=True,
        drop_last=True,
        collate_fn=task.collate,
    )
    model.train()
    steps, start = 0, time.perf_counter()
    while steps < trainer["max_steps"]:
        for batch in batches:
            loss = task.loss(model, batch)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            if steps == trainer["max_steps"]:
                break
    loss.item()
    return steps * trainer["batch_size"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    logging.disable(logging.INFO)  # the trainer's own log lines
    datasets.disable_progress_bars()  # the masked-LM task's tokenization bars
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps")
    print("| task | bare loop samples/s | graft-train samples/s | ratio (median of rounds) |")
    print("|---|---|---|---|")
    for name in args.tasks:
        cfg = config(TASKS[name], args.steps)
        bare, ours, ratios = [], [], []
        for round_index in range(args.rounds):
            order = (bare_loop_rate, graft_train_rate)
            if round_index % 2:
                order = order[::-1]
            rates = {run.__name__: run(cfg) for run in order}
            bare.append(rates["bare_loop_rate"])
            ours.append(rates["graft_train_rate"])
            ratios.append(ours[-1] / bare[-1])
        print(
            f"| {name} | {statistics.median(bare):.1f} | {statistics.median(ours):.1f} "
            f"| {statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)}) |"
        )


if __name__ == "__main__":
    main()
