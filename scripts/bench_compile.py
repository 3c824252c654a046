"""What Graft(compile=True) costs to compile, on real models' parameters, cold and warm.

For each model and grafted pair, a fresh process builds the model's parameters (random
weights and gradients, no download), takes the eager first step (it creates the state),
then times:

- **first compiled step**: the step that traces and compiles the graphs (or builds or
  loads the native loops), then runs;
- **steady step**: the median of the following steps, during which the learning rate
  changes every step (a LambdaLR) and the step count advances;
- **graphs**: graphs compiled in all (dynamo's `unique_graphs`), read after the first
  compiled step and again after the last: equal means nothing recompiled (none on the
  native path).

Each configuration runs on both paths of the compiled step (graft/optim/compiled.py):
**native** (the hand-written CPU loops, built by torch.utils.cpp_extension) and **graph**
(inductor's graphs, what every rule without native loops takes), and twice, in two
processes sharing fresh cache directories (inductor's and the extensions'): **cold**
(empty caches: for graphs tracing, lowering, C++ codegen and g++; for the native loops
their build) and **warm** (the second process: dynamo still traces, the FX-graph cache
skips lowering and g++; the native loops are loaded from the build).

    python scripts/bench_compile.py [--models resnet50 bert-base] [--paths native graph]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

PAIRS = {
    "adam#sgd": ({"name": "adam", "lr": 1e-3}, {"name": "sgd", "lr": 0.1, "momentum": 0.9}),
    "sgd#adam": ({"name": "sgd", "lr": 0.1, "momentum": 0.9}, {"name": "adam", "lr": 1e-3}),
    "adagrad#adam": (
        {"name": "adagrad", "lr": 0.1, "momentum": 0.9},
        {"name": "adam", "lr": 1e-3},
    ),
}
MODELS = ("resnet50", "bert-base")
PATHS = ("native", "graph")


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """The model's parameter shapes, built with random weights (nothing downloaded)."""
    if name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50(weights=None)
    else:
        from transformers import BertConfig, BertForMaskedLM

        model = BertForMaskedLM(BertConfig())  # BERT-base: 12 layers, hidden 768
    return [tuple(param.shape) for param in model.parameters()]


def child(model: str, pair: str, granularity: str, path: str, steps: int) -> dict:
    """One measurement in this process: returns the figures as a dict."""
    import torch
    from torch._dynamo.utils import counters

    from graft import Graft
    from graft.optim import compiled

    compiled.NATIVE = path == "native"

    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in model_shapes(model):
        param = torch.nn.Parameter(torch.randn(shape, generator=generator))
        param.grad = torch.randn(shape, generator=generator)
        params.append(param)
    magnitude, direction = PAIRS[pair]
    optimizer = Graft(params, magnitude, direction, granularity, compile=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    optimizer.step()  # eager: creates the state
    scheduler.step()
    start = time.perf_counter()
    optimizer.step()
    first = time.perf_counter() - start
    scheduler.step()
    graphs_after_first = counters["stats"]["unique_graphs"]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
        scheduler.step()
    return {
        "tensors": len(params),
        "values": sum(param.numel() for param in params),
        "first_s": first,
        "steady_ms": statistics.median(times) * 1e3,
        "graphs_first": graphs_after_first,
        "graphs_last": counters["stats"]["unique_graphs"],
        "compiled_steps": optimizer._compiled.steps,
        "tensor_steps": optimizer._compiled.tensor_steps,
        "failed": optimizer._compiled.failed,
    }


def run_child(model: str, pair: str, granularity: str, path: str, steps: int, cache: str):
    command = [sys.executable, __file__, "--child", model, pair, granularity, path, str(steps)]
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
        "TORCH_EXTENSIONS_DIR": os.path.join(cache, "extensions"),
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--granularities", nargs="+", default=["tensor", "global"])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--steps", type=int, default=8, help="steady steps timed (default 8)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, pair, granularity, path, steps = args.child
        print(json.dumps(child(model, pair, granularity, path, int(steps))))
        return

    import torch

    print(
        f"Command: `python {shlex.join(sys.argv)}`; torch {torch.__version__}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads.\n"
    )
    print(
        "| model | pair | granularity | path | tensors | graphs (first → last) | cold first "
        "compiled step s | warm first compiled step s | steady ms/step |"
    )
    print("|---|---|---|---|---:|---|---:|---:|---:|")
    for model, pair, granularity, path in itertools.product(
        args.models, args.pairs, args.granularities, args.paths
    ):
        with tempfile.TemporaryDirectory(prefix="graft-compile-caches-") as cache:
            cold = run_child(model, pair, granularity, path, args.steps, cache)
            warm = run_child(model, pair, granularity, path, args.steps, cache)
        if cold["failed"] or warm["failed"]:
            raise SystemExit(f"compile failed: {cold['failed'] or warm['failed']}")
        if warm["tensor_steps"][path] == 0:
            raise SystemExit(f"no tensor took the {path} path: {warm['tensor_steps']}")
        print(
            f"| {model} | {pair} | {granularity} | {path} | {cold['tensors']} "
            f"| {cold['graphs_first']} → {cold['graphs_last']} | {cold['first_s']:.1f} "
            f"| {warm['first_s']:.1f} | {warm['steady_ms']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
