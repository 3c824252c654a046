"""RMSprop (optionally centered, with momentum), as torch.optim.RMSprop."""

from __future__ import annotations

import torch
from torch import Tensor

from graft.common.validation import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL
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


class RMSprop(Rule):
    """g' = g + wd·w;  s ← α·s + (1-α)·g'²;  centered: a ← α·a + (1-α)·g', s̃ = s - a²;
    d = g' / (√s̃ + eps);  u = -lr·d, or with momentum μ > 0: b ← μ·b + d, u = -lr·b."""

    name = "rmsprop"
    defaults = {
        "lr": 1e-2,
        "alpha": 0.99,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "centered": False,
        "maximize": False,
    }
    constraints = {
        "alpha": UNIT_INTERVAL,
        "eps": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "momentum": NON_NEGATIVE,
    }
    torch_class = torch.optim.RMSprop
    setting = {"lr": 1e-3, "momentum": 0.5, "centered": True}
    variants = (
        Variant({"lr": 0.01}),
        Variant({"lr": 0.01, "momentum": 0.9, "centered": True, "weight_decay": 0.01}),
        Variant({"lr": 0.01, "alpha": 0.9, "centered": True, "maximize": True}),
        Variant({"lr": 0.01, "momentum": 0.5}),
        Variant({"lr": 1e-3, "weight_decay": 1e-3}, compiled=True),
    )

    @classmethod
    def init_state(cls, param: Tensor, hyper: Hyper) -> dict[str, Tensor]:
        state = {
            "step": new_step_count(),
            "square_avg": zeros(param),
        }
        if hyper["momentum"] > 0:
            state["momentum_buffer"] = zeros(param)
        if hyper["centered"]:
            state["grad_avg"] = zeros(param)
        return state

    @classmethod
    def flags(cls, hyper: Hyper, param: Tensor) -> Flags:
        return {
            "momentum": hyper["momentum"] > 0,
            "centered": hyper["centered"],
            "decay": hyper["weight_decay"] != 0,
            "maximize": hyper["maximize"],
        }

    @classmethod
    def scalars(cls, hyper: Hyper, step: float) -> dict[str, float]:
        return {
            "coeff": -hyper["lr"],
            "alpha": hyper["alpha"],
            "alpha_weight": 1 - hyper["alpha"],
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
        square_avg = state["square_avg"]
        if advance:
            square_avg.mul_(s["alpha"]).add_(grad * grad * s["alpha_weight"])
        if flags["centered"]:
            grad_avg = state["grad_avg"]
            if advance:
                grad_avg.lerp_(grad, s["alpha_weight"])
            denominator = (square_avg - grad_avg * grad_avg).sqrt() + s["eps"]
        else:
            denominator = square_avg.sqrt() + s["eps"]
        if not momentum:
            return grad / denominator, s["coeff"]
        buffer = state["momentum_buffer"]
        buffer.mul_(s["momentum"]).add_(grad / denominator)
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
        lr, alpha, momentum = hyper["lr"], hyper["alpha"], hyper["momentum"]
        step_counts(states, advance)
        if momentum > 0 and not advance:
            return Update([state["momentum_buffer"] for state in states], -lr)

        grads, _ = effective_grads(params, grads, hyper["weight_decay"], hyper["maximize"])
        square_avgs = [state["square_avg"] for state in states]
        if advance:
            torch._foreach_mul_(square_avgs, alpha)
            torch._foreach_addcmul_(square_avgs, grads, grads, 1 - alpha)
        if hyper["centered"]:
            grad_avgs = [state["grad_avg"] for state in states]
            if advance:
                torch._foreach_lerp_(grad_avgs, grads, 1 - alpha)
            denominators = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, -1)
            torch._foreach_sqrt_(denominators)
        else:
            denominators = torch._foreach_sqrt(square_avgs)
        torch._foreach_add_(denominators, hyper["eps"])

        if momentum == 0:
            directions = torch._foreach_div(grads, denominators)
            return Update(directions, -lr)
        buffers = [state["momentum_buffer"] for state in states]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_addcdiv_(buffers, grads, denominators)
        return Update(buffers, -lr)
