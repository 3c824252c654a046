"""Throughput of graft-train against a bare hand-written loop, interleaved in one run.

Both sides train the same model on the same data with the same optimizer (the config's
M#D Graft and its schedule) for the same number of steps, alternating A/B then B/A each round so
drift on a shared machine hits both alike. graft-train's figure is its own
`samples_per_s` (summary.json: training steps with data loading, logging and norm logging
included; evaluation and checkpoints excluded); the bare loop's is steps x batch over its
timed loop. Run: `python scripts/bench_trainer.py [--rounds 4] [--steps 40]`.

scripts/gpu_check.py's section (c) uses the same two sides on a device: `warm_steps` times
the second half of each run only (the first compiles and warms the caches), and each side
reports its peak device memory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
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


def overrides(task_overrides: list[str], steps: int, *extra: str) -> list[str]:
    """The run both sides train: `steps` steps, no evaluation until the end, no checkpoint."""
    return [
        *task_overrides,
        "logger=none",
        f"trainer.max_steps={steps}",
        "trainer.eval_every=0",  # one evaluation, at the end (excluded from samples/s)
        "trainer.checkpoint_every=0",
        "schedule.warmup_steps=0",  # any step count; the schedule's cost does not change
        *extra,
    ]


def config(command_line: list[str]) -> dict:
    """train.yaml composed with the command line's overrides, resolved."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("train", command_line), resolve=True)


@dataclass
class Throughput:
    samples_per_s: float
    peak_bytes: int | None  # the device's peak allocated memory (CUDA only)


def graft_train_rate(cfg: dict, warm_steps: int = 0) -> Throughput:
    """graft-train's own samples/s: over the whole run (summary.json), or with warm_steps
    over its second half (the run's last log line, with trainer.log_every=warm_steps and
    max_steps twice that), after the first steps have compiled and warmed the caches."""
    if warm_steps:
        cfg = {**cfg, "trainer": {**cfg["trainer"], "log_every": warm_steps}}
        assert cfg["trainer"]["max_steps"] == 2 * warm_steps
    reset_peak(cfg)
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stderr(io.StringIO()):
        assert train(cfg, Path(run_dir)) == 0
        if warm_steps:
            last = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()[-1]
            rate = json.loads(last)["train/samples_per_s"]
        else:
            rate = read_summary(Path(run_dir))["samples_per_s"]
    return Throughput(rate, peak(cfg))


def bare_loop_rate(cfg: dict, warm_steps: int = 0) -> Throughput:
    """The loop one would write by hand: shuffle, forward (under bf16 autocast and with
    channels-last images where the config says), backward, step, schedule. Its samples/s
    over the steps after warm_steps."""
    trainer = cfg["trainer"]
    device = torch.device(device_of(cfg))
    torch.manual_seed(trainer["seed"])
    task = build_task(cfg["task"], seed=trainer["seed"], cache_dir=Path(cfg["cache_dir"]))
    layout = torch.channels_last if trainer["channels_last"] else torch.contiguous_format
    model = task.model.to(device, memory_format=layout)
    optimizer = build_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg["schedule"], trainer["max_steps"])
    forward = torch.compile(model) if trainer["compile"] else model
    batches = DataLoader(
        task.train_set,
        batch_size=trainer["batch_size"],
        shuffle=True,
        drop_last=True,
        collate_fn=task.collate,
        num_workers=trainer["num_workers"],
        pin_memory=device.type == "cuda",
    )

    def moved(batch):
        if isinstance(batch, Mapping):  # token blocks
            return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        images, labels = batch
        images = images.to(device, non_blocking=True, memory_format=layout)
        return images, labels.to(device, non_blocking=True)

    reset_peak(cfg)
    model.train()
    steps, timed = 0, trainer["max_steps"] - warm_steps
    start = time.perf_counter()  # as graft-train's clock: from before the first batch
    while steps < trainer["max_steps"]:
        for batch in batches:
            if steps == warm_steps and warm_steps:
                synchronize(device)
                start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=trainer["bf16"]):
                loss = task.loss(forward, moved(batch))
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            if steps == trainer["max_steps"]:
                break
    loss.item()  # waits for the device
    return Throughput(timed * trainer["batch_size"] / (time.perf_counter() - start), peak(cfg))


def device_of(cfg: dict) -> str:
    device = cfg["trainer"]["device"]
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(cfg: dict) -> None:
    if torch.device(device_of(cfg)).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(cfg: dict) -> int | None:
    if torch.device(device_of(cfg)).type == "cuda":
        return torch.cuda.max_memory_allocated()
    return None


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
        cfg = config(overrides(TASKS[name], args.steps))
        bare, ours, ratios = [], [], []
        for round_index in range(args.rounds):
            order = (bare_loop_rate, graft_train_rate)
            if round_index % 2:
                order = order[::-1]
            rates = {run.__name__: run(cfg).samples_per_s for run in order}
            bare.append(rates["bare_loop_rate"])
            ours.append(rates["graft_train_rate"])
            ratios.append(ours[-1] / bare[-1])
        print(
            f"| {name} | {statistics.median(bare):.1f} | {statistics.median(ours):.1f} "
            f"| {statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)}) |"
        )


if __name__ == "__main__":
    main()
