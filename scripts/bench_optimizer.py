"""Time and size one optimizer step of Graft against torch.optim on ResNet-50's parameters.

Per configuration it measures:

- **time**: median wall-clock ms of one ``opt.step()``, and its ratio to the baseline
  "torch Adam + torch SGD" (both ``foreach=True``; one step of each, summed per round).
  Grafting M#D must run both M and D, so that sum is what a fused graft should cost.
  torch's single-kernel ``fused=True`` optimizers are listed as a reference below it, and
  torch's defaults (no ``foreach``/``fused`` given: on a CPU, a loop over tensors).
- **persistent state**: bytes of every tensor in ``opt.state`` (nested dicts included).
- **transient peak**: the most memory the step holds beyond what existed before it. CPU
  torch has no ``max_memory_allocated``, so one extra, untimed step runs under the
  profiler with ``profile_memory=True`` and its allocation events are summed in time
  order; a toy case of known size checks the method at start-up.
- **bandwidth floor**: the bytes per parameter the step must move at least (read p, g and
  the state, write p and the state, each once) divided by the memory bandwidth of an
  in-place update ``a.add_(b)`` on large fp32 tensors: the time of one perfect pass.
  The in-place probe, not ``dst.copy_(src)``, sets the floor: an optimizer writes only
  arrays it has just read, while a copy's writes to a cold ``dst`` cost an extra read
  (write-allocate), so counting 2 bytes moved per byte copied understates the bandwidth
  (here torch's fused Adam beat that "floor"). Both bandwidths are printed.

Why interleaved: on a small shared machine clock speed, caches and neighbours drift over
a minute. Timing each configuration in its own block folds that drift into the
comparison; here every round times one step of every configuration (and the bandwidth
probes) in a freshly shuffled order, so drift hits all alike and medians compare alike.

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
PROBE_NUMEL = 64 * 2**20  # elements per bandwidth-probe tensor (268 MB in fp32)
MB = 1e6
ADAM = {"name": "adam", "lr": 1e-3}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
ADAGRAD = {"name": "adagrad", "lr": 0.1, "momentum": 0.9}  # momentum 0.9 as in the paper


@dataclass
class Config:
    """An optimizer to benchmark.

    make: builds it over fresh parameters.
    bytes_per_param: compulsory memory traffic per fp32 parameter, as `traffic` spells it.
    """

    label: str
    make: Callable[[list[Tensor]], torch.optim.Optimizer]
    bytes_per_param: int
    traffic: str


ADAM_TRAFFIC, SGD_TRAFFIC = "r p,g,m,v; w p,m,v", "r p,g,b; w p,b"
CONFIGS = [
    Config(
        "torch Adam (foreach)",
        lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
        28,
        ADAM_TRAFFIC,
    ),
    Config(
        "torch SGD (foreach)",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
        20,
        SGD_TRAFFIC,
    ),
    Config(
        "torch Adam (default)",
        lambda p: torch.optim.Adam(p, lr=1e-3),
        28,
        ADAM_TRAFFIC,
    ),
    Config(
        "torch SGD (default)",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        20,
        SGD_TRAFFIC,
    ),
    Config(
        "Graft adam#sgd",
        lambda p: graft.Graft(p, magnitude=ADAM, direction=SGD),
        36,
        "r p,g,m,v,b; w p,m,v,b",
    ),
    Config(
        "Graft sgd#adam",
        lambda p: graft.Graft(p, magnitude=SGD, direction=ADAM),
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
        "tensor-wise + r p,b again: norms first",
    ),
    Config(
        "Graft adam#sgd, black box",
        lambda p: graft.Graft(p, magnitude=ADAM, direction=SGD, black_box=True),
        36,
        "as adam#sgd",
    ),
    Config(
        "Graft adam#sgd, black box, fp32 copies",
        lambda p: graft.Graft(
            p, magnitude=ADAM, direction=SGD, black_box=True, black_box_fp64=False
        ),
        36,
        "as adam#sgd",
    ),
    Config(
        "Graft adam#sgd, compiled",
        lambda p: graft.Graft(p, magnitude=ADAM, direction=SGD, compile=True),
        36,
        "as adam#sgd",
    ),
    Config(
        "Graft sgd#adam, compiled",
        lambda p: graft.Graft(p, magnitude=SGD, direction=ADAM, compile=True),
        36,
        "as sgd#adam",
    ),
    Config(
        "Graft adagrad#adam, compiled",
        lambda p: graft.Graft(p, magnitude=ADAGRAD, direction=ADAM, compile=True),
        44,
        "as adagrad#adam",
    ),
    Config(
        "Graft adam#sgd, global, compiled",
        lambda p: graft.Graft(p, magnitude=ADAM, direction=SGD, granularity="global", compile=True),
        40,
        "as adam#sgd, global",
    ),
    Config(
        "torch Adam (fused)",
        lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
        28,
        ADAM_TRAFFIC,
    ),
    Config(
        "torch SGD (fused)",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
        20,
        SGD_TRAFFIC,
    ),
]
# Rows derived by summing two configurations' times per round: (label, parts).
BASELINE = "torch Adam + torch SGD (foreach)"
SUMS = {
    BASELINE: ("torch Adam (foreach)", "torch SGD (foreach)"),
    "torch Adam + torch SGD (fused)": ("torch Adam (fused)", "torch SGD (fused)"),
    "torch Adam + torch SGD (default)": ("torch Adam (default)", "torch SGD (default)"),
}
# Table order: torch foreach and their sum (the baseline), Graft, then torch fused.
ORDER = [
    "torch Adam (foreach)",
    "torch SGD (foreach)",
    BASELINE,
    "Graft adam#sgd",
    "Graft sgd#adam",
    "Graft adagrad#adam",
    "Graft adam#sgd, global",
    "Graft adam#sgd, black box",
    "Graft adam#sgd, black box, fp32 copies",
    "Graft adam#sgd, compiled",
    "Graft sgd#adam, compiled",
    "Graft adagrad#adam, compiled",
    "Graft adam#sgd, global, compiled",
    "torch Adam (fused)",
    "torch SGD (fused)",
    "torch Adam + torch SGD (fused)",
    "torch Adam (default)",
    "torch SGD (default)",
    "torch Adam + torch SGD (default)",
]


@dataclass
class Probe:
    """Something timed once per round: one optimizer step, or one bandwidth probe.

    bytes_moved: for a bandwidth probe, the bytes one call reads and writes.
    """

    label: str
    run: Callable[[], object]
    optimizer: torch.optim.Optimizer | None = None
    bytes_moved: int = 0
    times: list[float] = field(default_factory=list)

    def time_once(self) -> None:
        start = time.perf_counter()
        self.run()
        self.times.append(time.perf_counter() - start)

    def bandwidth(self) -> float:
        """Bytes per second (bandwidth probes only), from the median time."""
        return self.bytes_moved / statistics.median(self.times)


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


def bandwidth_probes() -> tuple[Probe, Probe]:
    """An in-place update a += b (reads a and b, writes a) and a copy dst ← src."""
    generator = torch.Generator().manual_seed(SEED)
    a, b = (torch.randn(PROBE_NUMEL, generator=generator) for _ in range(2))
    src, dst = torch.randn(PROBE_NUMEL, generator=generator), torch.empty(PROBE_NUMEL)
    nbytes = PROBE_NUMEL * 4
    # ±1e-30 leaves a unchanged in fp32 (|a| ≫ 1e-30 almost everywhere), so the
    # probe's data do not drift over rounds.
    update = Probe("in-place a += b", lambda: a.add_(b, alpha=1e-30), bytes_moved=3 * nbytes)
    copy = Probe("copy dst ← src", lambda: dst.copy_(src), bytes_moved=2 * nbytes)
    return update, copy


def run_rounds(probes: list[Probe], rounds: int, rng: random.Random) -> None:
    """Time each probe once per round, in a new random order every round."""
    for _ in range(rounds):
        order = list(probes)
        rng.shuffle(order)
        for probe in order:
            probe.time_once()


def transient_peak(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by `fn` beyond what was allocated when it started.

    The profiler records every CPU allocation (+bytes) and free (-bytes); their running
    sum in time order is the memory held at each moment, relative to the start. (A block
    allocated before and freed during `fn` has no event, torch warns once; only tiny
    blocks do so here, e.g. the previous step's norm vectors.)
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


@dataclass
class Row:
    label: str
    times: list[float]  # seconds per step, one per round
    state: int  # bytes
    transient: int  # bytes
    bytes_per_param: int
    traffic: str

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3


def measure_rows(probes: list[Probe]) -> dict[str, Row]:
    """A row per configuration (transient from one more, profiled step) and per sum."""
    rows = {}
    for config, probe in zip(CONFIGS, probes):
        transient = transient_peak(probe.optimizer.step)
        state = graft.optim.state_bytes(probe.optimizer)
        rows[config.label] = Row(
            config.label, probe.times, state, transient, config.bytes_per_param, config.traffic
        )
    for label, (first, second) in SUMS.items():
        a, b = rows[first], rows[second]
        rows[label] = Row(
            label,
            [ta + tb for ta, tb in zip(a.times, b.times)],
            a.state + b.state,
            max(a.transient, b.transient),  # run one after the other: the larger peak
            a.bytes_per_param + b.bytes_per_param,
            "sum of the two",
        )
    return rows


def table(rows: dict[str, Row], numel: int, bandwidth: float) -> str:
    baseline_ms = rows[BASELINE].median_ms
    lines = [
        "| configuration | median ms/step | IQR ms | × torch Adam+SGD | state MB | "
        "transient peak MB | floor B/param (traffic) | floor ms | time / floor |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for label in ORDER:
        row = rows[label]
        q1, _, q3 = statistics.quantiles([t * 1e3 for t in row.times], n=4)
        floor_ms = row.bytes_per_param * numel / bandwidth * 1e3
        name = f"**{label}**" if label == BASELINE else label
        lines.append(
            f"| {name} | {row.median_ms:.1f} | {q1:.1f}–{q3:.1f} "
            f"| {row.median_ms / baseline_ms:.2f} | {row.state / MB:.1f} "
            f"| {row.transient / MB:.1f} | {row.bytes_per_param} ({row.traffic}) "
            f"| {floor_ms:.1f} | {row.median_ms / floor_ms:.1f} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def header(args: argparse.Namespace, shapes: list[torch.Size], numel: int) -> str:
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    return (
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.  \n"
        f"Command: `{command}` ({args.warmup} warmup + {args.rounds} timed rounds, "
        "each timing every row once, in shuffled order).  \n"
        f"Parameters: ResNet-50, {len(shapes)} fp32 tensors, {numel:,} values "
        f"({numel * 4 / MB:.1f} MB); Adam lr 1e-3, SGD lr 0.1 momentum 0.9, "
        "AdaGrad momentum 0.9."
    )


def footnotes(update: Probe, copy: Probe, peak_check_mb: float) -> str:
    size = f"{PROBE_NUMEL * 4 / MB:.0f} MB tensors"
    return (
        f"Bandwidth (median of {len(update.times)}, timed in the same rounds): in-place "
        f"`a.add_(b)` {update.bandwidth() / 1e9:.1f} GB/s (3 × {size}), the floor's; "
        f"`dst.copy_(src)` {copy.bandwidth() / 1e9:.1f} GB/s (2 × {size}).  \n"
        "Floor: compulsory traffic per parameter (r read, w write; p weight, g grad, m/v Adam "
        "moments, b momentum buffer, s AdaGrad sum) / in-place bandwidth.  \n"
        "State: bytes of all tensors in `opt.state`. Transient peak: most memory allocated "
        "during one step beyond what existed before it, from the profiler's allocation "
        f"events (check: two 100 MB tensors at once read {peak_check_mb:.1f} MB).  \n"
        "Sum rows: times summed per round, states summed, transient = the larger of the "
        "two. MB = 10^6 bytes."
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed rounds first, >= 2: the first creates the state, the second compiles "
        "(default 3)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.rounds < 2 or args.warmup < 2:
        parser.error(
            f"--rounds {args.rounds} --warmup {args.warmup}; allowed: rounds >= 2, warmup >= 2"
        )
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    peak_check_mb = check_transient_peak()
    shapes = resnet50_shapes()
    numel = sum(shape.numel() for shape in shapes)
    optimizers = optimizer_probes(shapes)
    update, copy = bandwidth_probes()
    probes = [*optimizers, update, copy]
    rng = random.Random(SEED)

    run_rounds(probes, args.warmup, rng)  # also creates the optimizers' state and compiles
    for probe in probes:
        probe.times.clear()
    run_rounds(probes, args.rounds, rng)

    rows = measure_rows(optimizers)
    print(header(args, shapes, numel))
    print()
    print(table(rows, numel, update.bandwidth()))
    print()
    print(footnotes(update, copy, peak_check_mb))


if __name__ == "__main__":
    main()
