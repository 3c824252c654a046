"""How exactly the black-box path measures a small step: one fp32 M#D step, against the same
step taken in fp64 arithmetic from the same weights and gradient.

For each D's lr it prints the relative error ‖u - u_exact‖ / ‖u_exact‖ of the applied step
for the built-in rule (D computed without touching the weights), for the same optimizer from
torch.optim on the black-box path (D steps an fp64 copy and is measured there), and for that
path with `black_box_fp64=False` (an fp32 copy), with the share of weights each black-box
step left unmoved. D's lr cancels in the grafted step, so every row should read alike; what
is left is rounding the new weights to fp32.

    python scripts/black_box_precision.py [--magnitude adam] [--direction sgd]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from graft import Graft

LRS = (1e-1, 1e-3, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10, 1e-12)
TORCH_NAMES = {
    "sgd": "torch.optim.SGD",
    "adam": "torch.optim.Adam",
    "adagrad": "torch.optim.Adagrad",
}


def model_with_grads(seed: int = 0) -> nn.Module:
    """A small fp32 model (a conv kernel, matrices, biases, a norm) with one batch's gradient."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(2, 3, kernel_size=3, padding=1),
        nn.Flatten(),
        nn.LayerNorm(12),
        nn.Linear(12, 7),
        nn.Tanh(),
        nn.Linear(7, 3),
    )
    inputs, targets = torch.randn(16, 2, 4), torch.randn(16, 3)
    nn.functional.mse_loss(model(inputs), targets).backward()
    return model


def grafted_step(
    model: nn.Module, magnitude: dict, direction: dict, dtype: torch.dtype, **options
) -> torch.Tensor:
    """The step one Graft.step() takes on a copy of `model` in `dtype`, as fp64."""
    twin = copy.deepcopy(model).to(dtype)
    for mine, param in zip(twin.parameters(), model.parameters()):
        mine.grad = param.grad.to(dtype)
    start = torch.cat([p.detach().double().flatten() for p in twin.parameters()])
    Graft(twin.parameters(), magnitude, direction, **options).step()
    return torch.cat([p.detach().double().flatten() for p in twin.parameters()]) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--magnitude", default="adam", choices=sorted(TORCH_NAMES))
    parser.add_argument("--direction", default="sgd", choices=sorted(TORCH_NAMES))
    args = parser.parse_args()
    model = model_with_grads()
    magnitude = {"name": args.magnitude, "lr": 1e-3}
    black_box = TORCH_NAMES[args.direction]
    print(
        f"torch {torch.__version__}: one fp32 {args.magnitude}#{args.direction} step (M's lr 1e-3)"
    )
    print(f"against fp64 arithmetic; D is `{args.direction}` built in, or `{black_box}`")
    print()
    print("| D's lr | built-in | black box (fp64 copies) | black box, fp32 copies |")
    print("|---|---|---|---|")
    runs = (
        (args.direction, {}),
        (black_box, {}),
        (black_box, {"black_box_fp64": False}),
    )
    for lr in LRS:
        exact = grafted_step(model, magnitude, {"name": args.direction, "lr": lr}, torch.float64)
        cells = []
        for name, options in runs:
            step = grafted_step(
                model, magnitude, {"name": name, "lr": lr}, torch.float32, **options
            )
            error = ((step - exact).norm() / exact.norm()).item()
            unmoved = (step == 0).double().mean().item()
            cells.append(f"{error:.1e}" + (f" ({unmoved:.0%} unmoved)" if unmoved else ""))
        print(f"| {lr:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
