"""How exactly the black-box path measures a small step: one fp32 M#D step, against the same
step taken in fp64 arithmetic from the same weights and gradient.

For each D's lr it prints the relative error ‖u - u_exact‖ / ‖u_exact‖ of the applied step
for the built-in rule (D computed without touching the weights), for the same optimizer from
torch.optim on the black-box path (D steps an fp64 copy and is measured there), and for that
path with `black_box_fp64=False` (an fp32 copy), with the share of the weights that the exact
step, rounded to fp32, moves and the path left where they were. D's lr cancels in the
grafted step, so every row should read alike; what is left is rounding the new weights to
fp32.

    python scripts/black_box_precision.py [--magnitude adam] [--direction sgd]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torchvision
from torch import nn

from graft import Graft

LRS = (1e-1, 1e-3, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10, 1e-12)
TORCH_NAMES = {
    "sgd": "torch.optim.SGD",
    "adam": "torch.optim.Adam",
    "adagrad": "torch.optim.Adagrad",
}


def model_with_grads(seed: int = 0) -> nn.Module:
    """torchvision's ResNet-18 (convolutions, batch norms, a classifier) with one batch's
    gradient on random 32x32 images."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(images), labels).backward()
    return model


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def grafted_step(
    model: nn.Module, magnitude: dict, direction: dict, dtype: torch.dtype, **options
) -> torch.Tensor:
    """The step one Graft.step() takes on a copy of `model` in `dtype`, as fp64."""
    twin = copy.deepcopy(model).to(dtype)  # same weights, gradients and batch-norm buffers
    for mine, param in zip(twin.parameters(), model.parameters()):
        mine.grad = param.grad.to(dtype)
    start = flat_weights(twin)
    Graft(twin.parameters(), magnitude, direction, **options).step()
    return flat_weights(twin) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--magnitude", default="adam", choices=sorted(TORCH_NAMES))
    parser.add_argument("--direction", default="sgd", choices=sorted(TORCH_NAMES))
    args = parser.parse_args()
    model = model_with_grads()
    start = flat_weights(model)  # fp32 values
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
        moves = (start + exact).float().double() != start  # the weights fp32 can move
        cells = []
        for name, options in runs:
            step = grafted_step(
                model, magnitude, {"name": name, "lr": lr}, torch.float32, **options
            )
            error = ((step - exact).norm() / exact.norm()).item()
            lost = (moves & (step == 0)).double().sum().item() / moves.sum().item()
            cells.append(f"{error:.1e}" + (f" ({100 * lost:.3g} % not moved)" if lost else ""))
        print(f"| {lr:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
