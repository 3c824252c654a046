"""Where the compiled grafted step's time goes, on ResNet-50's large tensors (CPU).

`Graft(compile=True)` steps SGD, Adam and AdaGrad through hand-written CPU loops
(graft/optim/native) and every other rule through one inductor graph per tensor. This
script times both, and the inductor variants one would try to make the graph faster,
all over ResNet-50's tensors above 65,536 values (35 tensors, 24.8 M of its 25.6 M
values, random weights and gradients), each row once per round in a shuffled order
(interleaved, so drift on a shared machine hits all rows alike):

- **native loops**: the shipped CPU step for these rules: one loop advances both states
  and sums both norms, a second adds the grafted update from D's advanced state.
- **compiled step**: the graph (`tensor_step`) other rules take: both states advanced,
  both norms, the grafted update applied. Inductor emits two loops: the norms' reduction,
  then the stores, which recompute the states' update from the old state.
- **compiled update, no norms**: the same graph without grafting's norms (both rules
  advanced, D's update applied unscaled): one loop, the work of stepping M and D.
- **compiled norms, no stores**: only the norms of both updates, the states left as
  they are: the reduction loop alone.
- **compiled advance + norms, then apply**: the least-traffic form, two graphs: the
  first stores the advanced states in the loops that reduce the norms, the second
  applies D's update read from its advanced state.
- **torch fused M + D (no grafting)**: torch's single-kernel CPU optimizers
  (`fused=True`) on copies of the same tensors: what hand-written loops reach.

Then the reductions alone, each a sum of squares over every gradient: compiled flat
(inductor sums more than 4,096 fp32 values in a cascade, for accuracy), compiled over
rows of at most 4,096 values (no cascade), and `torch.dot`. And the fixed cost of one
compiled call: the compiled step on 1-value tensors.

"bytes/value" is the compulsory traffic of the row's loops (each array they read or
write counted once per loop); GB/s is that traffic over the median time.

    python scripts/bench_compiled_kernels.py [--pair adam#sgd] [--rounds 12]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from bench_compile import PAIRS
from bench_optimizer import cpu_model, parameters_with_grads, random_tensors, resnet50_shapes

import graft
from graft.optim import compiled, native
from graft.optim.combine import grafting_ratio
from graft.optim.compiled import advanced, graph_arguments, norm, side_update, tensor_step

LARGE = 65_536  # values: the tensors whose loops, not the per-call cost, set the time
ROW = 4096  # the longest sum inductor's C++ backend adds up without a cascade
SEED = 0
# The two-pass form needs inductor to keep each state's stores in the loop that reduces
# its norm: realize every update that has more than one reader, fuse without shared reads.
TWO_PASS_OPTIONS = {"realize_reads_threshold": 0, "aggressive_fusion": True}
# Compulsory traffic per value in bytes (fp32), per pair: (native, step, no norms, norms
# only, two-pass). Native adam#sgd: r g,m,v,b w m,v,b, then r p,b w p (sgd#adam: r p,m,v).
TRAFFIC = {"adam#sgd": (40, 52, 36, 12, 44), "sgd#adam": (44, 52, 36, 12, 48)}


def update_only(param, grad, m_state, d_state, m_packed, d_packed, magnitude, direction, eps):
    """Both rules advanced, D's update applied unscaled: a step without grafting's norms."""
    side_update(param, grad, m_state, m_packed, magnitude, advance=True)
    tensor, coeff = side_update(param, grad, d_state, d_packed, direction, advance=True)
    param.add_(tensor * coeff)


def norms_only(param, grad, m_state, d_state, m_packed, d_packed, magnitude, direction, eps):
    """The norms of both updates from the current states (copies of the dicts: nothing
    is written)."""
    m_tensor, m_coeff = side_update(param, grad, dict(m_state), m_packed, magnitude, False)
    d_tensor, d_coeff = side_update(param, grad, dict(d_state), d_packed, direction, False)
    return norm(m_tensor) * m_coeff.abs(), norm(d_tensor) * d_coeff.abs()


def advance_and_norms(param, grad, grad_again, m_state, d_state, m_packed, d_packed, m, d):
    """Both states advanced, their norms. The gradient comes twice (the same memory) so
    that each state's loop reads its own input and inductor keeps the loops apart."""
    m_norm = advanced(param, grad, m_state, m_packed, m)[2]
    return m_norm, advanced(param, grad_again, d_state, d_packed, d)[2]


def flat_sum_of_squares(tensor):
    return (tensor * tensor).sum()


def row_sum_of_squares(rows):
    return (rows * rows).sum(dim=1).sum()


def row_length(numel: int) -> int:
    """The longest row of at most ROW values that divides `numel`."""
    return next(length for length in range(ROW, 0, -1) if numel % length == 0)


def build(pair: str) -> tuple[dict[str, Callable[[], object]], dict[str, float], int]:
    """The rows to time (name -> one call over every large tensor), their bytes per
    value, and the number of values."""
    magnitude, direction = PAIRS[pair]
    generator = torch.Generator().manual_seed(SEED)
    shapes = [shape for shape in resnet50_shapes() if shape.numel() > LARGE]
    values, grads = random_tensors(shapes, generator), random_tensors(shapes, generator)
    optimizer = graft.Graft(
        parameters_with_grads(values, grads), magnitude=magnitude, direction=direction
    )
    optimizer.step()  # eager: creates the states the graphs take
    step = compiled.CompiledStep("tensor")
    items = step.items(optimizer)
    compiled.pack_scalars(items)
    numel = sum(item.param.numel() for item in items)

    options = {"dynamic": True, "fullgraph": True}
    shipped = torch.compile(tensor_step, **options, options=compiled.INDUCTOR_OPTIONS)
    no_norms = torch.compile(update_only, **options, options=compiled.INDUCTOR_OPTIONS)
    norms = torch.compile(norms_only, **options, options=compiled.INDUCTOR_OPTIONS)
    first_pass = torch.compile(advance_and_norms, **options, options=TWO_PASS_OPTIONS)
    apply = torch.compile(compiled.apply_pass, **options, options=compiled.INDUCTOR_OPTIONS)

    def each(graph) -> Callable[[], None]:
        return lambda: [graph(*graph_arguments(item)) for item in items]

    def two_pass() -> None:
        for item in items:
            m_norm, d_norm = first_pass(
                item.param, item.grad, item.grad.view(-1), item.m_state, item.d_state,
                item.m_packed, item.d_packed, item.magnitude, item.direction,
            )  # fmt: skip
            scale = grafting_ratio(m_norm, d_norm, item.eps)
            apply(item.param, item.grad, item.d_state, item.d_packed, item.direction, scale)

    fused = [
        graft.optim.spec.rule_of(spec).torch_class(
            parameters_with_grads(values, grads),
            fused=True,
            **{key: value for key, value in spec.items() if key != "name"},
        )
        for spec in (magnitude, direction)
    ]
    for optimizer in fused:
        optimizer.step()

    flat_sum = torch.compile(flat_sum_of_squares, **options)
    row_sum = torch.compile(row_sum_of_squares, **options)
    rows = [grad.view(-1, row_length(grad.numel())) for grad in grads]
    flats = [grad.view(-1) for grad in grads]

    calls = native.calls(enumerate(items))

    native_bytes, step_bytes, no_norm_bytes, norms_bytes, two_pass_bytes = TRAFFIC[pair]
    timed = {
        "native loops (shipped for these rules)": (
            lambda: [call.step() for call in calls],
            native_bytes,
        ),
        "compiled step (shipped for other rules)": (each(shipped), step_bytes),
        "compiled update, no norms": (each(no_norms), no_norm_bytes),
        "compiled norms, no stores": (each(norms), norms_bytes),
        "compiled advance + norms, then apply": (two_pass, two_pass_bytes),
        "torch fused M + D (no grafting)": (
            lambda: [optimizer.step() for optimizer in fused],
            no_norm_bytes + 12,  # each reads and writes the weight
        ),
        "sum of squares, compiled flat": (lambda: [flat_sum(g) for g in flats], 4),
        f"sum of squares, compiled rows ≤ {ROW}": (lambda: [row_sum(r) for r in rows], 4),
        "sum of squares, torch.dot": (lambda: [torch.dot(g, g) for g in flats], 4),
    }
    return (
        {name: run for name, (run, _) in timed.items()},
        {name: traffic for name, (_, traffic) in timed.items()},
        numel,
    )


def per_call_us(pair: str, calls: int = 300) -> float:
    """Median µs of the shipped graph on 1-value tensors: the fixed cost of one call."""
    magnitude, direction = PAIRS[pair]
    param = torch.nn.Parameter(torch.randn(1))
    param.grad = torch.randn(1)
    optimizer = graft.Graft([param], magnitude=magnitude, direction=direction)
    optimizer.step()
    step = compiled.CompiledStep("tensor")
    items = step.items(optimizer)
    compiled.pack_scalars(items)
    graph = torch.compile(
        tensor_step, dynamic=True, fullgraph=True, options=compiled.INDUCTOR_OPTIONS
    )
    arguments = graph_arguments(items[0])
    graph(*arguments)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        graph(*arguments)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(TRAFFIC), default="adam#sgd")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()

    rows, traffic, numel = build(args.pair)
    for run in rows.values():  # compile, and settle the states
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in rows}
    rng = random.Random(SEED)
    for _ in range(args.rounds):
        order = list(rows)
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            rows[name]()
            times[name].append(time.perf_counter() - start)

    print(
        f"Machine: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads. Pair {args.pair}; {numel:,} values in ResNet-50's tensors above "
        f"{LARGE:,} values; median of {args.rounds} interleaved rounds.\n"
    )
    print("| row | ms | bytes/value | GB/s |\n|---|---:|---:|---:|")
    for name, samples in times.items():
        seconds = statistics.median(samples)
        rate = traffic[name] * numel / seconds / 1e9
        print(f"| {name} | {seconds * 1e3:.1f} | {traffic[name]} | {rate:.1f} |")
    print(f"\nOne compiled call on 1-value tensors: {per_call_us(args.pair):.0f} µs.")


if __name__ == "__main__":
    main()
