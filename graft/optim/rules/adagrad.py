"""AdaGrad as torch.optim.Adagrad, plus heavy-ball momentum on the preconditioned step."""

from __future__ import annotations

import torch
from torch import Tensor

from graft.common.validation import NON_NEGATIVE, POSITIVE
from graft.optim.rules.base import (
    Flags,
    Hyper,
    Rule,
    Variant,
    effective_grad,
    effective_grads,
    new_step_count,
    step_counts,
    zeros,
)
from graft.optim.update import Update


class Adagrad(Rule):
    """g' = g + wd·w;  s ← s + g'²;  lrₜ = lr / (1 + (t-1)·lr_decay);
    d = g' / (√s + eps);  u = -lrₜ·d, or with momentum μ > 0: b ← μ·b + d, u = -lrₜ·b.

    momentum (not in torch.optim.Adagrad, default 0 = torch's rule exactly) is there
    because the grafting paper runs AdaGrad with momentum 0.9.
    """

    name = "adagrad"
    defaults = {
        "lr": 1e-2,
        "lr_decay": 0.0,
        "weight_decay": 0.0,
        "initial_accumulator_value": 0.0,
        "eps": 1e-10,
        "maximize": False,
        "momentum": 0.0,
    }
    constraints = {
        "lr_decay": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "initial_accumulator_value": NON_NEGATIVE,
        "eps": POSITIVE,
        "momentum": NON_NEGATIVE,
    }
    torch_class = torch.optim.Adagrad
    setting = {"lr": 0.05, "momentum": 0.9}
    variants = (
        Variant({"lr": 0.1}),
        Variant(
            {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.1}
        ),
        Variant({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "lr_decay": 0.1, "eps": 1e-10}),
        Variant({"lr": 0.05, "lr_decay": 0.01, "weight_decay": 1e-3}, compiled=True),
        Variant({"lr": 0.05, "maximize": True}, compiled=True),
    )
    note = "momentum on the preconditioned step, as the paper runs AdaGrad (0: torch's rule)"

    @classmethod
    def reference_class(cls, hyper: Hyper) -> type[torch.optim.Optimizer] | None:
        return cls.torch_class if hyper["momentum"] == 0 else None

    @classmethod
    def init_state(cls, param: Tensor, hyper: Hyper) -> dict[str, Tensor]:
        state = {
            "step": new_step_count(),
            "sum": torch.full_like(
                param, hyper["initial_accumulator_value"], memory_format=torch.preserve_format
            ),
        }
        if hyper["momentum"] != 0:
            state["momentum_buffer"] = zeros(param)
        return state

    @classmethod
    def flags(cls, hyper: Hyper, param: Tensor) -> Flags:
        return {
            "momentum": hyper["momentum"] != 0,
            "decay": hyper["weight_decay"] != 0,
            "maximize": hyper["maximize"],
        }

    @classmethod
    def scalars(cls, hyper: Hyper, step: float) -> dict[str, float]:
        return {
            "coeff": -hyper["lr"] / (1 + (step - 1) * hyper["lr_decay"]),
            "eps": hyper["eps"],
            "momentum": hyper["momentum"],
            "weight_decay": hyper["weight_decay"],
        }

    @classmethod
    def pointwise(cls, param, grad, state, s, flags, advance):
        momentum = flags["momentum"]
        if momentum and not advance:
            return state["momentum_buffer"], s["coeff"]
        grad = effective_grad(param, grad, s, flags["maximize"], flags["decay"])
        if advance:
            state["sum"].add_(grad * grad)
        direction = grad / (state["sum"].sqrt() + s["eps"])
        if not momentum:
            return direction, s["coeff"]
        buffer = state["momentum_buffer"]
        buffer.mul_(s["momentum"]).add_(direction)
        return buffer, s["coeff"]

    @classmethod
    def step(
        cls,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        hyper: Hyper,
        advance: bool,
    ) -> Update:
        momentum = hyper["momentum"]
        steps = step_counts(states, advance)
        coeffs = [-hyper["lr"] / (1 + (step - 1) * hyper["lr_decay"]) for step in steps]
        if momentum != 0 and not advance:
            return Update([state["momentum_buffer"] for state in states], coeffs)

        grads, _ = effective_grads(params, grads, hyper["weight_decay"], hyper["maximize"])
        sums = [state["sum"] for state in states]
        if advance:
            torch._foreach_addcmul_(sums, grads, grads, 1.0)
        denominators = torch._foreach_sqrt(sums)
        torch._foreach_add_(denominators, hyper["eps"])
        if momentum == 0:
            return Update(torch._foreach_div(grads, denominators), coeffs)

        buffers = [state["momentum_buffer"] for state in states]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_addcdiv_(buffers, grads, denominators)
        return Update(buffers, coeffs)
