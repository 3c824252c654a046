"""Time and size one optimizer step of Graft against torch.optim on ResNet-50's parameters.

Per configuration it measures:

- **time**: median wall-clock ms of one ``opt.step()``, and its ratio to the baseline
  "torch Adam + torch SGD" (both ``foreach=True``; one step of each, summed per round).
  Grafting M#D must run both M and D, so that sum is what a fused graft should cost.
- **persistent state**: bytes of every tensor in ``opt.state`` (nested dicts included).
- **transient peak**: the most memory the step holds beyond what existed before it. CPU
  torch has no ``max_memory_allocated``, so one extra, untimed step runs under the
  profiler with ``profile_memory=True`` and its allocation events are summed in time
  order; a toy case of known size checks the method at start-up.
- **bandwidth floor**: the bytes per parameter the step must move at least (read p, g and
  the state, write p and the state, each once) divided by the copy bandwidth that
  ``dst.copy_(src)`` reaches on large fp32 tensors: the time of a perfect single pass.

Why interleaved: on a small shared machine clock speed, caches and neighbours drift over
a minute. Timing each configuration in its own block folds that drift into the
comparison; here every round times one step of every configuration (the copy probe
included) in a freshly shuffled order, so drift hits all alike and medians compare
like with like.

    python scripts/bench_optimizer.py [--rounds 15] [--warmup 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's log lines off stderr

import torch
import torchvision
from torch import Tensor
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import graft

SEED = 0
COPY_NUMEL = 64 * 2**20  # elements per copy-probe tensor (256 MB in fp32)
MB = 1e6
BASELINE = "torch Adam + torch SGD"
ADAM = {"name": "adam", "lr": 1e-3}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
ADAGRAD = {"name": "adagrad", "lr": 0.1, "momentum": 0.9}  # momentum 0.9 as in the paper


@dataclass
class Config:
    """An optimizer to benchmark.

    make: builds it over fresh parameters.
    bytes_per_param: compulsory memory traffic per fp32 parameter (see `floor_note`).
    """

    label: str
    make: Callable[[list[Tensor]], torch.optim.Optimizer]
    bytes_per_param: int
    floor_note: str


CONFIGS = [
    Config(
        "torch Adam (foreach)",
        lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
        28,
        "r p,g,m,v; w p,m,v",
    ),
    Config(
        "torch SGD momentum (foreach)",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
        20,
        "r p,g,b; w p,b",
    ),
    Config(
        "Graft adam#sgd",
        lambda p: graft.Graft(p, magnitude=ADAM, direction=SGD),
        36,
        "r p,g,m,v,b; w p,m,v,b",
    ),
    Config(
        "Graft sgd#adam",
        lambda p: graft.Graft(p, magnitude={**SGD, "lr": 0.1}, direction=ADAM),
        36,
        "r p,g,b,m,v; w p,b,m,v",
    ),
    Config(
        "Graft adagrad#adam",
        lambda p: graft.Graft(p, magnitude=ADAGRAD, direction=ADAM),
        44,
        "r p,g,s,b,m,v; w p,s,b,m,v",
    ),
    Config(
        "Graft adam#sgd, global",
        lambda p: graft.Graft(p, magnitude=ADAM, direction=SGD, granularity="global"),
        40,
        "as tensor-wise + r p,b again (2nd pass)",
    ),
    Config(
        "Graft adam#sgd, generic",
        lambda p: graft.Graft(p, magnitude=ADAM, direction=SGD, generic=True),
        36,
        "same math as adam#sgd",
    ),
]


@dataclass
class Probe:
    """Something timed once per round: one optimizer step, or one copy."""

    label: str
    run: Callable[[], object]
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)

    def time_once(self) -> None:
        start = time.perf_counter()
        self.run()
        self.times.append(time.perf_counter() - start)


def resnet50_shapes() -> list[torch.Size]:
    """The shapes of ResNet-50's parameters (built without weights: no download)."""
    model = torchvision.models.resnet50(weights=None)
    return [param.shape for param in model.parameters()]


def random_tensors(shapes: list[torch.Size], generator: torch.Generator) -> list[Tensor]:
    return [torch.randn(shape, generator=generator) for shape in shapes]


def parameters_with_grads(values: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """Fresh leaf parameters (copies of `values`), each with its own copy of the gradient."""
    params = []
    for value, grad in zip(values, grads):
        param = torch.nn.Parameter(value.clone())
        param.grad = grad.clone()
        params.append(param)
    return params


def state_bytes(state: object, seen: set[int] | None = None) -> int:
    """Bytes of all tensors in a (nested) optimizer state, each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(state, Tensor):
        storage = state.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(state, dict):
        return sum(state_bytes(value, seen) for value in state.values())
    if isinstance(state, list | tuple):
        return sum(state_bytes(value, seen) for value in state)
    return 0


def transient_peak(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by `fn` beyond what was allocated when it started.

    The profiler records every CPU allocation (+bytes) and free (-bytes); their running
    sum in time order is the memory held at each moment, relative to the start.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        event
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    ]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def check_transient_peak() -> float:
    """Check `transient_peak` on a case of known answer: two 100 MB tensors alive at once,
    then one more after both are freed, must peak at 200 MB. Returns the measured MB."""
    numel = int(100 * MB) // 4

    def toy() -> None:
        a, b = torch.ones(numel), torch.ones(numel)
        del a, b
        c = torch.ones(numel)
        del c

    measured = transient_peak(toy) / MB
    if abs(measured - 200) > 1:
        raise RuntimeError(f"profiler peak check: measured {measured:.1f} MB, expected 200 MB")
    return measured


def optimizer_probes(shapes: list[torch.Size]) -> list[Probe]:
    """One probe per configuration, each over its own parameters and gradients."""
    generator = torch.Generator().manual_seed(SEED)
    values = random_tensors(shapes, generator)
    grads = random_tensors(shapes, generator)
    probes = []
    for config in CONFIGS:
        optimizer = config.make(parameters_with_grads(values, grads))
        probes.append(Probe(config.label, optimizer.step, optimizer))
    return probes


def copy_probe() -> Probe:
    src = torch.randn(COPY_NUMEL, generator=torch.Generator().manual_seed(SEED))
    dst = torch.empty_like(src)
    return Probe("copy", lambda: dst.copy_(src))


def run_rounds(probes: list[Probe], rounds: int, rng: random.Random) -> None:
    """Time each probe once per round, in a new random order every round."""
    for _ in range(rounds):
        order = list(probes)
        rng.shuffle(order)
        for probe in order:
            probe.time_once()


@dataclass
class Row:
    label: str
    times: list[float]  # seconds per step, one per round
    state: int  # bytes
    transient: int  # bytes
    bytes_per_param: int
    floor_note: str

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3


def measure_rows(probes: list[Probe]) -> list[Row]:
    """Rows for every configuration plus the derived baseline (after timing is done)."""
    rows = []
    for config, probe in zip(CONFIGS, probes):
        transient = transient_peak(probe.optimizer.step)
        state = state_bytes(probe.optimizer.state)
        rows.append(
            Row(
                probe.label,
                probe.times,
                state,
                transient,
                config.bytes_per_param,
                config.floor_note,
            )
        )
    adam, sgd = rows[0], rows[1]
    baseline = Row(
        BASELINE,
        [a + s for a, s in zip(adam.times, sgd.times)],
        adam.state + sgd.state,
        max(adam.transient, sgd.transient),  # run one after the other: the larger peak
        adam.bytes_per_param + sgd.bytes_per_param,
        "Adam's + SGD's",
    )
    return rows[:2] + [baseline] + rows[2:]


def bandwidth(probe: Probe) -> float:
    """Copy bandwidth in bytes/s: each copy reads and writes COPY_NUMEL fp32 values."""
    return 2 * COPY_NUMEL * 4 / statistics.median(probe.times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def table(rows: list[Row], numel: int, copy_bandwidth: float) -> str:
    baseline_ms = next(row for row in rows if row.label == BASELINE).median_ms
    lines = [
        "| configuration | median ms/step | IQR ms | × torch Adam+SGD | state MB | "
        "transient peak MB | floor B/param (traffic) | floor ms | time / floor |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        q1, _, q3 = statistics.quantiles([t * 1e3 for t in row.times], n=4)
        floor_ms = row.bytes_per_param * numel / copy_bandwidth * 1e3
        lines.append(
            f"| {row.label} | {row.median_ms:.1f} | {q1:.1f}–{q3:.1f} "
            f"| {row.median_ms / baseline_ms:.2f} | {row.state / MB:.1f} "
            f"| {row.transient / MB:.1f} | {row.bytes_per_param} ({row.floor_note}) "
            f"| {floor_ms:.1f} | {row.median_ms / floor_ms:.1f} |"
        )
    return "\n".join(lines)


def header(args: argparse.Namespace, shapes: list[torch.Size], numel: int) -> str:
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    return (
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.\n"
        f"Command: `{command}` ({args.warmup} warmup + {args.rounds} timed rounds, "
        f"interleaved in shuffled order).\n"
        f"Parameters: ResNet-50, {len(shapes)} fp32 tensors, {numel:,} values "
        f"({numel * 4 / MB:.1f} MB)."
    )


def footnotes(copy: Probe, peak_check_mb: float) -> str:
    return (
        f"Copy bandwidth: {bandwidth(copy) / 1e9:.2f} GB/s (`dst.copy_(src)`, "
        f"2 × {COPY_NUMEL * 4 / MB:.0f} MB per copy, median of {len(copy.times)}, "
        "timed in the same rounds).\n"
        "State: bytes of all tensors in `opt.state`. Transient peak: most memory allocated "
        "during one step beyond what existed before it (profiler allocation events; "
        f"check: two 100 MB tensors at once read {peak_check_mb:.1f} MB). Baseline row: "
        "times summed per round, states summed, transient = the larger of the two.\n"
        "Floor: compulsory traffic per parameter (r = read, w = write; p weight, g grad, "
        "m/v Adam moments, b momentum buffer, s AdaGrad sum) / copy bandwidth. MB = 10^6 B."
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.rounds < 2 or args.warmup < 1:
        parser.error(
            f"--rounds {args.rounds} --warmup {args.warmup}; allowed: rounds >= 2, warmup >= 1"
        )
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    peak_check_mb = check_transient_peak()
    shapes = resnet50_shapes()
    numel = sum(shape.numel() for shape in shapes)
    probes = optimizer_probes(shapes)
    copy = copy_probe()
    rng = random.Random(SEED)

    run_rounds(probes + [copy], args.warmup, rng)  # also creates the optimizers' state
    for probe in probes + [copy]:
        probe.times.clear()
    run_rounds(probes + [copy], args.rounds, rng)

    rows = measure_rows(probes)
    print(header(args, shapes, numel))
    print()
    print(table(rows, numel, bandwidth(copy)))
    print()
    print(footnotes(copy, peak_check_mb))


if __name__ == "__main__":
    main()
