"""One prepared run that checks Graft on an accelerator, and writes what it saw.

    python scripts/gpu_check.py [--device cuda|cpu] [--quick] --out DIR

writes DIR/gpu_check.md (and prints it) and exits 1 if any check fails. Sections:

(a) correctness: every pair of built-in rules in both granularities, eager on the device,
    against the same run on the CPU in float64, over 10 steps; the compiled step
    (`compile=True`: on a GPU one graph for the whole step) for the paper's pairs; bf16
    parameters, eager and compiled; fp32 weights under fp16 autocast with torch's
    GradScaler, a step with an infinite gradient skipped.
(b) optimizer speed: one step of Graft adam#sgd, sgd#adam and adagrad#adam, eager and
    compiled, against torch's foreach and fused Adam + SGD (one step of each), on
    ResNet-50's and BERT-base's parameter shapes, timed in one interleaved run (each round
    every contender once, in a fresh order; medians), and each step's memory-traffic floor:
    the bytes it must move (read weight, gradient and state; write weight and state) over
    the copy bandwidth measured in the same run.

(c) trainer throughput: samples/s of graft-train against a bare hand-written loop on
    synthetic ImageNet-shaped (ResNet-50, bf16, channels_last) and BERT-shaped (BERT-base,
    bf16) batches, with and without graft.compile, and the peak memory of each
    (scripts/device_checks/trainer_throughput.py).
(d) distributed: torchrun over every GPU here (NCCL), a rank killed once the first
    checkpoint is written, the run resumed and compared with an uninterrupted one
    (scripts/device_checks/distributed_resume.py).

`--device cpu --quick` runs the same code on the CPU in a few minutes, on smaller
models, with fewer compiled cases and adam#sgd alone in (b), and two gloo ranks in (d):
tests/test_gpu_check.py runs it. (a) takes the GPU's
compiled path there too (one graph for the whole step, through inductor's C++); (b) times
the CPU's own (the native loops), since a whole-step graph of a real model takes minutes of
C++ to compile on a small CPU. On a GPU the whole run is meant to take at most 8 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from device_checks import trainer_throughput
from device_checks.checks import Check
from device_checks.distributed_resume import distributed_resume
from torch import nn

import graft.optim.compiled as compiled
from graft.optim import GRANULARITIES, RULES, Graft, state_bytes

STEPS = 10
SPECS = {name: {"name": name, **rule.setting} for name, rule in RULES.items()}
PAPER_RULES = ("sgd", "adam", "adagrad")
# The largest weight difference allowed, relative to the largest weight, after each step.
FP32_TOLERANCE = 1e-5  # fp32 on the device against fp64 on the CPU
BF16_TOLERANCE = 3e-2  # bf16 weights: a few of bf16's 2^-8 relative steps over 10 steps
AUTOCAST_TOLERANCE = 1e-3  # an fp16 forward and backward against an fp32 one


def make_model(dtype: torch.dtype, device: str) -> nn.Module:
    """A conv kernel, matrices, biases and a norm scale: the tensor kinds the rules treat
    differently (LARS and LAMB leave 1-D tensors alone by default)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, kernel_size=3, padding=1),
        nn.Flatten(),
        nn.LayerNorm(32),
        nn.Linear(32, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    )
    return model.to(device=device, dtype=dtype)


def batch(step: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(16, 2, 8, generator=generator, dtype=torch.float64)
    targets = torch.randn(16, 3, generator=generator, dtype=torch.float64)
    return inputs.to(device, dtype), targets.to(device, dtype)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])


def run(
    magnitude: dict,
    direction: dict | None,
    granularity: str,
    dtype: torch.dtype,
    device: str,
    compile: bool = False,  # noqa: A002 - Graft's keyword
) -> tuple[list[torch.Tensor], Graft]:
    """The weights after each of STEPS steps, and the optimizer."""
    model = make_model(dtype, device)
    optimizer = Graft(model.parameters(), magnitude, direction, granularity, compile=compile)
    trajectory = []
    for step in range(STEPS):
        inputs, targets = batch(step, dtype, device)
        model.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        trajectory.append(flat(model))
    return trajectory, optimizer


def difference(trajectory: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest weight difference over the steps, relative to the largest weight."""
    return max(
        ((a - e).abs().max() / e.abs().max()).item()
        for a, e in zip(trajectory, reference, strict=True)
    )


@contextlib.contextmanager
def whole_step_on(device: str) -> Iterator[None]:
    """The GPU's compiled path (one graph for the whole step) for this device's tensors: on
    a CPU, through inductor's C++ (a minute of compiling per graph on a small machine)."""
    devices = compiled.WHOLE_STEP_DEVICES
    compiled.WHOLE_STEP_DEVICES = (*devices, device)
    try:
        yield
    finally:
        compiled.WHOLE_STEP_DEVICES = devices


def compiled_path(optimizer: Graft) -> str:
    """Which compiled path stepped the tensors, or why none did."""
    step = optimizer._compiled
    if step.failed is not None:
        return f"failed: {step.failed}"
    paths = [path for path, count in step.tensor_steps.items() if count]
    return "+".join(paths) or "none"


def correctness(device: str, quick: bool, say: Callable[[str], None]) -> list[Check]:
    checks = []
    names = list(SPECS)
    for magnitude, direction in itertools.product(names, repeat=2):
        for granularity in GRANULARITIES:
            args = (SPECS[magnitude], SPECS[direction], granularity)
            reference, _ = run(*args, torch.float64, "cpu")
            trajectory, _ = run(*args, torch.float32, device)
            error = difference(trajectory, reference)
            checks.append(
                Check(
                    "eager",
                    f"{magnitude}#{direction}, {granularity}",
                    error,
                    FP32_TOLERANCE,
                    error <= FP32_TOLERANCE,
                )
            )
    say(f"  eager: {len(checks)} cases")

    if quick:
        compiled_cases = [("adam", "sgd", "tensor"), ("sgd", "adam", "global")]
    else:
        compiled_cases = [
            *((m, d, "tensor") for m, d in itertools.product(PAPER_RULES, repeat=2)),
            *((m, d, "global") for m, d in (("adam", "sgd"), ("sgd", "adam"))),
        ]
    for magnitude, direction, granularity in compiled_cases:
        args = (SPECS[magnitude], SPECS[direction], granularity)
        started = time.perf_counter()
        reference, _ = run(*args, torch.float64, "cpu")
        with warnings.catch_warnings(record=True) as caught, whole_step_on(device):
            warnings.simplefilter("always")
            trajectory, optimizer = run(*args, torch.float32, device, compile=True)
        path = compiled_path(optimizer)
        error = difference(trajectory, reference)
        ok = error <= FP32_TOLERANCE and optimizer._compiled.failed is None and not caught
        note = f"path {path}; {time.perf_counter() - started:.1f} s"
        if caught:
            note += f"; warned: {caught[0].message}"
        checks.append(
            Check(
                "compiled",
                f"{magnitude}#{direction}, {granularity}",
                error,
                FP32_TOLERANCE,
                ok,
                note,
            )
        )
        say(f"  compiled {magnitude}#{direction}, {granularity}: {note}")

    pair = (SPECS["adam"], SPECS["sgd"], "tensor")
    reference, _ = run(*pair, torch.float64, "cpu")
    for compile in (False, True):
        with whole_step_on(device):
            trajectory, optimizer = run(*pair, torch.bfloat16, device, compile=compile)
        error = difference(trajectory, reference)
        label = "compiled" if compile else "eager"
        note = f"path {compiled_path(optimizer)}" if compile else ""
        ok = error <= BF16_TOLERANCE and (not compile or optimizer._compiled.failed is None)
        checks.append(Check("bf16", f"adam#sgd, tensor, {label}", error, BF16_TOLERANCE, ok, note))
    checks += autocast_checks(device)
    return checks


def autocast_checks(device: str) -> list[Check]:
    """fp32 weights, an fp16 forward and backward under autocast, torch's GradScaler: the
    weights follow the fp32 run, and a step whose gradient is infinite is skipped (the
    weights unchanged, the scale lowered), its batch then taken again."""
    pair = (SPECS["adam"], SPECS["sgd"])
    reference, _ = run(*pair, "tensor", torch.float32, device)
    model = make_model(torch.float32, device)
    optimizer = Graft(model.parameters(), *pair)
    scaler = torch.amp.GradScaler(device)
    trajectory: list[torch.Tensor] = []
    skipped = None  # (weights unchanged, scale lowered) at the injected overflow
    while len(trajectory) < STEPS:
        inputs, targets = batch(len(trajectory), torch.float32, device)
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16):
            loss = nn.functional.mse_loss(model(inputs).float(), targets)
        scaler.scale(loss).backward()
        inject = len(trajectory) == 3 and skipped is None
        if inject:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        before, scale = flat(model), scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        lowered = scaler.get_scale() < scale
        if inject:
            skipped = (torch.equal(flat(model), before), lowered)
        if not lowered:  # a step that overflowed, injected or not, is taken again
            trajectory.append(flat(model))
    error = difference(trajectory, reference)
    unchanged, lowered = skipped
    return [
        Check(
            "fp16 autocast",
            "adam#sgd with GradScaler",
            error,
            AUTOCAST_TOLERANCE,
            error <= AUTOCAST_TOLERANCE,
        ),
        Check(
            "fp16 autocast",
            "an infinite gradient's step is skipped",
            None,
            None,
            unchanged and lowered,
            f"weights {'unchanged' if unchanged else 'moved'}, "
            f"scale {'lowered' if lowered else 'kept'}",
        ),
    ]


# (b): the optimizers timed. Graft's pairs as the paper runs them (momentum 0.9 throughout).
ADAM = {"name": "adam", "lr": 1e-3}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
ADAGRAD = {"name": "adagrad", "lr": 0.1, "momentum": 0.9}
GRAFTED = {"adam#sgd": (ADAM, SGD), "sgd#adam": (SGD, ADAM), "adagrad#adam": (ADAGRAD, ADAM)}
BASELINE = "torch Adam + SGD, fused"


def shapes(quick: bool) -> dict[str, list[torch.Size]]:
    """Parameter shapes of the models timed (quick: smaller ones of the same kinds)."""
    import torchvision  # here: a refused command line should not wait for these imports
    from transformers import BertConfig, BertForMaskedLM

    if quick:
        resnet = torchvision.models.resnet18()
        bert = BertConfig(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256
        )
        names = ("ResNet-18", "BERT, 1 layer of 64")
    else:
        resnet = torchvision.models.resnet50()
        bert = BertConfig()  # BERT-base
        names = ("ResNet-50", "BERT-base")
    models = (resnet, BertForMaskedLM(bert))
    return {name: [p.shape for p in model.parameters()] for name, model in zip(names, models)}


@dataclass
class Contender:
    """Optimizers stepped one after the other as one contender (torch's Adam + SGD)."""

    label: str
    optimizers: list[torch.optim.Optimizer]
    floor_bytes: int = 0

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def contenders(sizes: list[torch.Size], device: str, pairs: list[str]) -> list[Contender]:
    def params() -> list[torch.Tensor]:
        generator = torch.Generator(device=device).manual_seed(0)
        made = []
        for size in sizes:
            param = torch.randn(size, device=device, generator=generator)
            param.grad = torch.randn(size, device=device, generator=generator) * 1e-2
            made.append(param)
        return made

    made = []
    for kind in ("foreach", "fused"):
        keyword = {kind: True}
        made.append(
            Contender(
                f"torch Adam + SGD, {kind}",
                [
                    torch.optim.Adam(params(), lr=1e-3, **keyword),
                    torch.optim.SGD(params(), lr=0.1, momentum=0.9, **keyword),
                ],
            )
        )
    for name in pairs:
        magnitude, direction = GRAFTED[name]
        for compile in (False, True):
            label = f"Graft {name}, {'compiled' if compile else 'eager'}"
            made.append(Contender(label, [Graft(params(), magnitude, direction, compile=compile)]))
    return made


def traffic(contender: Contender) -> int:
    """The bytes one step must move: read each weight and gradient, write each weight, and
    read and write the state, once each (per optimizer: torch's Adam and SGD each do)."""
    total = 0
    for optimizer in contender.optimizers:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        total += 3 * sum(p.numel() * p.element_size() for p in params)
        total += 2 * state_bytes(optimizer)
    return total


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(action: Callable[[], None], device: str) -> float:
    synchronize(device)
    started = time.perf_counter()
    action()
    synchronize(device)
    return time.perf_counter() - started


def copy_bandwidth(device: str, numel: int) -> Callable[[], float]:
    """A probe: bytes per second of dst.copy_(src) (a read and a write per byte copied)."""
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    return lambda: (
        2 * source.numel() * source.element_size() / timed(lambda: target.copy_(source), device)
    )


@dataclass
class Timing:
    model: str
    label: str
    median_ms: float
    floor_ms: float
    ratio_to_baseline: float = 0.0
    note: str = ""


def speed(device: str, quick: bool, say: Callable[[str], None]) -> tuple[list[Timing], float]:
    rounds, warmup = (5, 3) if quick else (20, 3)
    probe = copy_bandwidth(device, 2**22 if quick else 2**28)
    timings, bandwidths = [], []
    for model, sizes in shapes(quick).items():
        runners = contenders(sizes, device, ["adam#sgd"] if quick else list(GRAFTED))
        setup = {}
        for runner in runners:  # the first steps create the state and compile
            setup[runner.label] = sum(timed(runner.step, device) for _ in range(warmup))
            runner.floor_bytes = traffic(runner)
        times: dict[str, list[float]] = {runner.label: [] for runner in runners}
        order = random.Random(0)
        for _ in range(rounds):
            order.shuffle(runners)
            for runner in runners:
                times[runner.label].append(timed(runner.step, device))
            bandwidths.append(probe())
        bandwidth = statistics.median(bandwidths)
        rows = {}
        for runner in runners:
            compiled_step = getattr(runner.optimizers[0], "_compiled", None)
            note = f"first {warmup} steps {setup[runner.label]:.1f} s"
            if compiled_step is not None:
                note += f"; path {compiled_path(runner.optimizers[0])}"
            rows[runner.label] = Timing(
                model,
                runner.label,
                1e3 * statistics.median(times[runner.label]),
                1e3 * runner.floor_bytes / bandwidth,
                note=note,
            )
        for row in rows.values():
            row.ratio_to_baseline = row.median_ms / rows[BASELINE].median_ms
        timings += sorted(rows.values(), key=lambda row: row.label)
        say(f"  {model}: {len(runners)} contenders, {rounds} rounds")
    return timings, statistics.median(bandwidths)


def speed_report(timings: list[Timing], bandwidth: float) -> list[str]:
    lines = [
        "",
        "## (b) Optimizer speed",
        "",
        f"Median ms of one step over interleaved rounds; copy bandwidth {bandwidth / 1e9:.1f} GB/s",
        "(same run); floor: the step's compulsory bytes at that bandwidth. On a CPU a copy's",
        "writes cost an extra read (write-allocate), so the floor there is low: see",
        "scripts/bench_optimizer.py for the CPU's own figures.",
        "",
        f"| model | optimizer | ms | × {BASELINE} | floor ms | × floor | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in timings:
        lines.append(
            f"| {row.model} | {row.label} | {row.median_ms:.3f} | {row.ratio_to_baseline:.2f} "
            f"| {row.floor_ms:.3f} | {row.median_ms / row.floor_ms:.2f} | {row.note} |"
        )
    return lines


def device_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    return platform.processor() or platform.machine()


def report(checks: list[Check], device: str, quick: bool, seconds: float) -> list[str]:
    failed = [check for check in checks if not check.passed]
    lines = [
        "# gpu_check",
        "",
        f"- device: {device} — {device_name(device)}",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- mode: {'quick' if quick else 'full'}; {seconds:.0f} s",
        f"- **{len(checks) - len(failed)} of {len(checks)} checks passed**",
        "",
        "## (a) Correctness",
        "",
        "Weights after each of 10 steps against the same run on the CPU in float64 (largest",
        "difference over the steps, relative to the largest weight).",
        "",
        *check_table([check for check in checks if check.section != "distributed"]),
    ]
    return lines


def check_table(checks: list[Check]) -> list[str]:
    lines = [
        "| section | case | difference | allowed | verdict | note |",
        "|---|---|---|---|---|---|",
    ]
    for check in checks:
        error = "" if check.error is None else f"{check.error:.2e}"
        tolerance = "" if check.tolerance is None else f"{check.tolerance:.0e}"
        verdict = "pass" if check.passed else "**FAIL**"
        lines.append(
            f"| {check.section} | {check.case} | {error} | {tolerance} | {verdict} | {check.note} |"
        )
    return lines


def distributed_report(checks: list[Check]) -> list[str]:
    return [
        "",
        "## (d) Distributed",
        "",
        "torchrun over the devices here; one rank sent SIGKILL after the first checkpoint;",
        "the same command run again; its final weights against an uninterrupted run's",
        "(largest difference of a tensor, relative to its norm).",
        "",
        *check_table([check for check in checks if check.section == "distributed"]),
    ]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer compiled cases")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        refuse("--device cuda: no CUDA device is visible here; allowed: --device cpu")
    if args.out.exists() and not args.out.is_dir():
        refuse(f"--out {args.out}: is a file; allowed: a folder (made if missing)")
    report_path = args.out / "gpu_check.md"
    if report_path.exists():
        refuse(
            f"--out {args.out}: {report_path} exists (a report is never overwritten); "
            "allowed: a folder without gpu_check.md"
        )
    return args


def refuse(message: str) -> None:
    """A user mistake: one line, exit code 2."""
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    say("(a) correctness")
    checks = correctness(args.device, args.quick, say)
    say("(b) optimizer speed")
    timings, bandwidth = speed(args.device, args.quick, say)
    say("(c) trainer throughput")
    throughput = trainer_throughput.throughput(args.device, args.quick, say)
    say("(d) distributed")
    checks += distributed_resume(args.device, say)
    lines = [
        *report(checks, args.device, args.quick, time.perf_counter() - started),
        *speed_report(timings, bandwidth),
        *trainer_throughput.report(throughput),
        *distributed_report(checks),
    ]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(text)
    print(text, end="")
    return 0 if all(check.passed for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
