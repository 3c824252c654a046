"""A small model with the tensor kinds optimizers treat differently, and a fixed loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from graft.optim.rules import RULES

TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}

# Each built-in rule at the setting every pair of rules is tested with (the registry's).
SPECS = {name: {"name": name, **rule.setting} for name, rule in RULES.items()}


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Matrices, a conv kernel, biases and a norm scale (the 1-D tensors LARS/LAMB skip)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(2, 3, kernel_size=3, padding=1),
        nn.Flatten(),
        nn.LayerNorm(12),
        nn.Linear(12, 7),
        nn.Tanh(),
        nn.Linear(7, 3),
    )
    return model.to(dtype)


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(16, 2, 4, generator=generator, dtype=dtype)
    targets = torch.randn(16, 3, generator=generator, dtype=dtype)
    return inputs, targets


def compute_grads(model: nn.Module, step: int) -> None:
    dtype = next(model.parameters()).dtype
    inputs, targets = batch(step, dtype)
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(inputs), targets).backward()


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    after_step: Callable[[int], None] | None = None,
    offset: int = 0,
) -> list[torch.Tensor]:
    """Run `steps` steps (on the batches of steps offset, offset + 1, ...); return the
    flattened weights after each one."""
    trajectory = []
    for step in range(offset, offset + steps):
        compute_grads(model, step)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        trajectory.append(flat(model))
    return trajectory


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def assert_trajectories_close(actual, expected, dtype, start=None, rtol=None) -> None:
    """Weights agree to `rtol` at every step, relative to the largest weight (a weight
    that crosses zero has no relative error of its own). In fp64 the steps taken from
    `start` must agree too: a stricter check, since the weights dwarf the steps."""
    rtol = TOLERANCE[dtype] if rtol is None else rtol
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        atol = rtol * e.abs().max().item()
        torch.testing.assert_close(
            a, e, rtol=rtol, atol=atol, msg=lambda m, step=step: f"step {step}: {m}"
        )
        if start is not None and dtype == torch.float64:
            moved = e - start
            atol = 1e-10 * moved.abs().max().item()
            torch.testing.assert_close(
                a - start, moved, rtol=1e-9, atol=atol, msg=lambda m, step=step: f"step {step}: {m}"
            )
