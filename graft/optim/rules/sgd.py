"""SGD with momentum, dampening, Nesterov and L2 weight decay, as torch.optim.SGD."""

from __future__ import annotations

import torch
from torch import Tensor

from graft.common.validation import NON_NEGATIVE, UNIT_INTERVAL
from graft.optim.rules.base import (
    Flags,
    Hyper,
    Rule,
    Variant,
    effective_grad,
    effective_grads,
)
from graft.optim.update import Update


class SGD(Rule):
    """g' = g + wd·w;  b ← μ·b + (1 - dampening)·g'  (b = g' at the first step);
    u = -lr·(g' + μ·b) with Nesterov, else -lr·b (or -lr·g' without momentum)."""

    name = "sgd"
    defaults = {
        "lr": 1e-3,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    }
    constraints = {
        "momentum": NON_NEGATIVE,
        "dampening": UNIT_INTERVAL,
        "weight_decay": NON_NEGATIVE,
    }
    torch_class = torch.optim.SGD
    setting = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    variants = (
        Variant({"lr": 0.1}),
        Variant({"lr": 0.1, "momentum": 0.9}),
        Variant({"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
        Variant({"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.1}),
        Variant({"lr": 0.05, "momentum": 0.5, "maximize": True}),
        Variant({"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True}, compiled=True),
        Variant({"lr": 0.05}, compiled=True),
        Variant({"lr": 0.05, "momentum": 0.9, "dampening": 0.5}, compiled=True),
    )

    @classmethod
    def check(cls, hyper: Hyper, where: str) -> None:
        super().check(hyper, where)
        if hyper["nesterov"] and (hyper["momentum"] <= 0 or hyper["dampening"] != 0):
            raise ValueError(
                f"invalid nesterov=True for 'sgd' in {where} with momentum="
                f"{hyper['momentum']!r}, dampening={hyper['dampening']!r}; "
                "allowed: nesterov needs momentum > 0 and dampening = 0"
            )

    @classmethod
    def state_keys(cls, hyper: Hyper) -> set[str]:
        return {"momentum_buffer"} if hyper["momentum"] != 0 else set()

    @classmethod
    def flags(cls, hyper: Hyper, param: Tensor) -> Flags:
        return {
            "momentum": hyper["momentum"] != 0,
            "nesterov": hyper["nesterov"],
            "decay": hyper["weight_decay"] != 0,
            "maximize": hyper["maximize"],
        }

    @classmethod
    def scalars(cls, hyper: Hyper, step: float) -> dict[str, float]:
        return {
            "coeff": -hyper["lr"],
            "momentum": hyper["momentum"],
            "undamped": 1 - hyper["dampening"],
            "weight_decay": hyper["weight_decay"],
        }

    @classmethod
    def pointwise(cls, param, grad, state, s, flags, advance):
        grad = effective_grad(param, grad, s, flags["maximize"], flags["decay"])
        if not flags["momentum"]:
            return grad, s["coeff"]
        buffer = state["momentum_buffer"]
        if advance:  # the first step, which starts the buffer at g', runs eagerly
            buffer.mul_(s["momentum"]).add_(grad * s["undamped"])
        if flags["nesterov"]:
            return grad + buffer * s["momentum"], s["coeff"]
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
        lr, momentum = hyper["lr"], hyper["momentum"]
        grads, owned = effective_grads(params, grads, hyper["weight_decay"], hyper["maximize"])
        if momentum == 0:
            return Update(grads, -lr)

        if advance:
            fresh = [i for i, state in enumerate(states) if "momentum_buffer" not in state]
            moving = [i for i, state in enumerate(states) if "momentum_buffer" in state]
            if moving:
                buffers = [states[i]["momentum_buffer"] for i in moving]
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(
                    buffers, [grads[i] for i in moving], alpha=1 - hyper["dampening"]
                )
            for i in fresh:  # torch.optim.SGD starts the buffer at g', undamped
                states[i]["momentum_buffer"] = grads[i].detach().clone()

        buffers = [state["momentum_buffer"] for state in states]
        if not hyper["nesterov"]:
            return Update(buffers, -lr)
        if owned:
            torch._foreach_add_(grads, buffers, alpha=momentum)
            return Update(grads, -lr)
        return Update(torch._foreach_add(grads, buffers, alpha=momentum), -lr)
