"""Adam and AdamW (bias-corrected moments; L2 or decoupled weight decay), as torch.optim."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from graft.common.validation import NON_NEGATIVE, POSITIVE
from graft.optim.rules.base import (
    BETAS,
    Flags,
    Hyper,
    Rule,
    Variant,
    add_scaled_,
    effective_grad,
    effective_grads,
    new_step_count,
    sqrt,
    step_counts,
    zeros,
)
from graft.optim.update import Update


class Adam(Rule):
    """g' = g + wd·w (L2; AdamW instead decays the weight directly);
    m ← β₁·m + (1-β₁)·g';  v ← β₂·v + (1-β₂)·g'²  (v̂ = running max of v with amsgrad);
    u = -lr/(1-β₁ᵗ) · m / (√v / √(1-β₂ᵗ) + eps)   [AdamW: - lr·wd·w].

    Computed as -lr·√(1-β₂ᵗ)/(1-β₁ᵗ) · m / (√v + eps·√(1-β₂ᵗ)): the same value with one
    pass over memory fewer; it matches torch.optim to fp32 rounding.
    """

    name = "adam"
    defaults = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
        "decoupled_weight_decay": False,
    }
    constraints = {"betas": BETAS, "eps": POSITIVE, "weight_decay": NON_NEGATIVE}
    torch_class = torch.optim.Adam
    setting = {"lr": 1e-3}
    variants = (
        Variant({"lr": 0.01}),
        Variant({"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
        Variant({"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}),
        Variant({"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
        Variant(
            {"lr": 1e-3, "amsgrad": True, "weight_decay": 0.1, "maximize": True}, compiled=True
        ),
    )

    @classmethod
    def init_state(cls, param: Tensor, hyper: Hyper) -> dict[str, Tensor]:
        state = {
            "step": new_step_count(),
            "exp_avg": zeros(param),
            "exp_avg_sq": zeros(param),
        }
        if hyper["amsgrad"]:
            state["max_exp_avg_sq"] = zeros(param)
        return state

    @classmethod
    def decoupled(cls, hyper: Hyper) -> bool:
        return hyper["decoupled_weight_decay"]

    @classmethod
    def flags(cls, hyper: Hyper, param: Tensor) -> Flags:
        decoupled = cls.decoupled(hyper)
        decay = hyper["weight_decay"] != 0
        return {
            "amsgrad": hyper["amsgrad"],
            "decoupled_decay": decoupled and decay,
            "decay": decay and not decoupled,
            "maximize": hyper["maximize"],
        }

    @classmethod
    def scalars(cls, hyper: Hyper, step: float) -> dict[str, float]:
        moments = moment_scalars(hyper, step)
        return {
            **moments,
            "coeff": -hyper["lr"] * moments["correction"],
            "weight_decay": hyper["weight_decay"],
            "decoupled_decay": -hyper["lr"] * hyper["weight_decay"],
        }

    @classmethod
    def pointwise(cls, param, grad, state, s, flags, advance):
        amsgrad = flags["amsgrad"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if advance:
            grad = effective_grad(param, grad, s, flags["maximize"], flags["decay"])
            advance_moments(exp_avg, exp_avg_sq, grad, s)
            if amsgrad:
                state["max_exp_avg_sq"].copy_(torch.maximum(state["max_exp_avg_sq"], exp_avg_sq))
        if amsgrad:
            exp_avg_sq = state["max_exp_avg_sq"]
        direction = exp_avg / (exp_avg_sq.sqrt() + s["eps"])
        if flags["decoupled_decay"]:
            return direction * s["coeff"] + param * s["decoupled_decay"], torch.ones_like(s["eps"])
        return direction, s["coeff"]

    @classmethod
    def step(
        cls,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        hyper: Hyper,
        advance: bool,
    ) -> Update:
        lr, eps, weight_decay = hyper["lr"], hyper["eps"], hyper["weight_decay"]
        beta1, beta2 = hyper["betas"]
        decoupled = cls.decoupled(hyper)
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        steps = step_counts(states, advance)

        if advance:
            grads, _ = effective_grads(
                params, grads, 0.0 if decoupled else weight_decay, hyper["maximize"]
            )
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            del grads
            if hyper["amsgrad"]:
                torch._foreach_maximum_([state["max_exp_avg_sq"] for state in states], exp_avg_sqs)

        if hyper["amsgrad"]:
            exp_avg_sqs = [state["max_exp_avg_sq"] for state in states]
        correction2 = [sqrt(1 - beta2**step) for step in steps]
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denominators, [eps * c for c in correction2])
        directions = torch._foreach_div(exp_avgs, denominators)
        del denominators
        coeffs = [-lr * c2 / (1 - beta1**step) for c2, step in zip(correction2, steps)]

        if decoupled and weight_decay != 0:
            torch._foreach_mul_(directions, coeffs)
            add_scaled_(directions, params, -lr * weight_decay)
            return Update(directions, 1.0)
        return Update(directions, coeffs)


def moment_scalars(hyper: Hyper, step: float) -> dict[str, float]:
    """Scalars of the moment updates at `step`, for `pointwise` (Adam and LAMB): the moments'
    weights, eps·√(1-β₂ᵗ), and the bias correction √(1-β₂ᵗ)/(1-β₁ᵗ)."""
    beta1, beta2 = hyper["betas"]
    correction2 = math.sqrt(1 - beta2**step)
    return {
        "beta1_weight": 1 - beta1,
        "beta2": beta2,
        "beta2_weight": 1 - beta2,
        "eps": hyper["eps"] * correction2,
        "correction": correction2 / (1 - beta1**step),
    }


def advance_moments(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, s: dict[str, Tensor]):
    """m ← β₁·m + (1-β₁)·g;  v ← β₂·v + (1-β₂)·g², in place, in `pointwise` form."""
    exp_avg.lerp_(grad, s["beta1_weight"])
    exp_avg_sq.mul_(s["beta2"]).add_(grad * grad * s["beta2_weight"])


class AdamW(Adam):
    """Adam with decoupled weight decay: u = Adam's step - lr·wd·w (torch.optim.AdamW)."""

    name = "adamw"
    defaults = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 1e-2,
        "amsgrad": False,
        "maximize": False,
    }
    torch_class = torch.optim.AdamW
    setting = {"lr": 2e-3, "weight_decay": 0.1}
    variants = (
        Variant({"lr": 0.01}),
        Variant({"lr": 0.01, "weight_decay": 0.2, "amsgrad": True}),
        Variant({"lr": 1e-3, "amsgrad": True, "maximize": True}, compiled=True),
    )

    @classmethod
    def decoupled(cls, hyper: Hyper) -> bool:
        return True
