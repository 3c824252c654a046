"""(c) of scripts/gpu_check.py: graft-train's samples/s against a bare hand-written loop.

Both sides (scripts/bench_trainer.py's) train the same synthetic batches
(`task.data.source=synthetic`: ImageNet-shaped images, BERT-shaped token blocks) with the
same M#D Graft and schedule, with and without `graft.compile`. Each side's rate is over the
second half of its steps, once the first half has compiled the step and warmed the caches;
rounds alternate which side goes first, so drift hits both alike. Peak memory is the
device's peak allocated bytes over the run (CUDA only).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import bench_trainer
import datasets
from bench_trainer import Throughput, bare_loop_rate, config, graft_train_rate

CELL = ["optim@magnitude=adam", "optim@direction=sgd"]  # adam#sgd, the paper's headline pair
FULL = {
    "ResNet-50, bf16, channels_last": [
        "task=imagenet_resnet50",  # bf16, channels_last and 8 loader workers: its own
        "trainer.batch_size=256",
        "task.data.eval_size=256",
        "schedule.milestones=[1000000]",
    ],
    "BERT-base, bf16": [
        "task=bert_base",  # bf16 and 8 loader workers: its own
        "task.tokenizer.name=null",  # a placeholder vocabulary of BERT's 30,522 tokens
        "trainer.batch_size=256",
        "task.data.eval_size=256",
    ],
}
QUICK = {  # the same code paths on small models
    "ResNet-18 at 32 px, bf16, channels_last": [
        "task=imagenet_resnet50",
        "task.model.name=resnet18",
        "task.data.image_size=32",
        "task.data.eval_size=8",
        "trainer.batch_size=16",
        "trainer.eval_batch_size=8",
        "trainer.num_workers=0",
        "schedule.milestones=[1000000]",
    ],
    "BERT, 1 layer of 64, bf16": [
        "task=bert_base",
        "task.tokenizer.name=null",
        "task.tokenizer.vocab_size=1024",
        "task.model.hidden_size=64",
        "task.model.num_hidden_layers=1",
        "task.model.num_attention_heads=2",
        "task.model.intermediate_size=256",
        "task.data.seq_len=32",
        "task.data.eval_size=8",
        "trainer.batch_size=16",
        "trainer.eval_batch_size=8",
        "trainer.num_workers=0",
    ],
}


def command_line(workload: list[str], device: str, compiled: bool, warm_steps: int) -> list[str]:
    """graft-train's overrides for a workload's run: twice warm_steps steps on synthetic data."""
    return bench_trainer.overrides(
        [*workload, *CELL, "task.data.source=synthetic"],
        2 * warm_steps,
        f"trainer.device={device}",
        f"graft.compile={str(compiled).lower()}",
        "trainer.progress=false",
        "trainer.log_norms_every=0",
    )


@dataclass
class Row:
    model: str
    compiled: bool
    bare: list[Throughput]
    trainer: list[Throughput]

    @property
    def ratios(self) -> list[float]:
        return [t.samples_per_s / b.samples_per_s for t, b in zip(self.trainer, self.bare)]


def throughput(device: str, quick: bool, say: Callable[[str], None]) -> list[Row]:
    """Quick: a check of the code path; its runs are too short for ratios to mean much."""
    warm_steps, rounds = (3, 2) if quick else (10, 2)
    logging.disable(logging.INFO)  # the trainer's own log lines
    datasets.disable_progress_bars()  # the eval blocks' masking
    rows = []
    for model, overrides in (QUICK if quick else FULL).items():
        for compiled in (False, True):
            cfg = config(command_line(overrides, device, compiled, warm_steps))
            row = Row(model, compiled, [], [])
            for round_index in range(rounds):
                sides = [(row.bare, bare_loop_rate), (row.trainer, graft_train_rate)]
                for results, side in sides[:: -1 if round_index % 2 else 1]:
                    results.append(side(cfg, warm_steps))
            rows.append(row)
            say(f"  {model}, graft.compile={compiled}: {statistics.median(row.ratios):.3f}x")
    return rows


def report(rows: list[Row]) -> list[str]:
    lines = [
        "",
        "## (c) Trainer throughput",
        "",
        "Samples/s of graft-train and of a bare hand-written loop (scripts/bench_trainer.py)",
        "on synthetic batches, adam#sgd, over the second half of each run's steps; medians of",
        "interleaved rounds. Peak: the device's peak allocated memory over the run.",
        "",
        "| model | graft.compile | bare loop samples/s | graft-train samples/s "
        "| × bare loop (rounds) | peak MiB bare | peak MiB graft-train |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratios = ", ".join(f"{ratio:.3f}" for ratio in row.ratios)
        lines.append(
            f"| {row.model} | {str(row.compiled).lower()} "
            f"| {statistics.median(t.samples_per_s for t in row.bare):.1f} "
            f"| {statistics.median(t.samples_per_s for t in row.trainer):.1f} "
            f"| {statistics.median(row.ratios):.3f} ({ratios}) "
            f"| {mebibytes(row.bare)} | {mebibytes(row.trainer)} |"
        )
    return lines


def mebibytes(runs: list[Throughput]) -> str:
    peaks = [run.peak_bytes for run in runs if run.peak_bytes is not None]
    return f"{max(peaks) / 2**20:.0f}" if peaks else "n/a"
