"""LAMB: layer-wise adaptive moments (You et al. 2019, arXiv 1904.00962, Algorithm 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from graft.common.validation import NON_NEGATIVE, POSITIVE
from graft.optim.rules.adam import advance_moments, moment_scalars
from graft.optim.rules.base import (
    BETAS,
    Flags,
    Hyper,
    Rule,
    Variant,
    new_step_count,
    norm,
    sqrt,
    step_counts,
    trust_ratios,
    zeros,
)
from graft.optim.update import Update, norms


class LAMB(Rule):
    """Per tensor w with gradient g at step t (You et al. 2019, Algorithm 2):

        m ← β₁·m + (1-β₁)·g;   v ← β₂·v + (1-β₂)·g²
        r  = (m / (1-β₁ᵗ)) / (√(v / (1-β₂ᵗ)) + eps) + wd·w
        u  = -lr · ‖w‖/‖r‖ · r

    The trust ratio ‖w‖/‖r‖ is 1 where either norm is 0 and, with `skip_1d` (the
    default), for tensors of at most one dimension (biases, norm scales).
    """

    name = "lamb"
    takes_norms = True  # the trust ratio ‖w‖ / ‖r‖
    defaults = {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-6,
        "weight_decay": 0.0,
        "skip_1d": True,
    }
    constraints = {"betas": BETAS, "eps": POSITIVE, "weight_decay": NON_NEGATIVE}
    setting = {"lr": 5e-3, "weight_decay": 0.01}
    variants = (
        Variant({"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
        Variant({"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-6, "skip_1d": False}),
        Variant({"lr": 5e-3, "skip_1d": False}, compiled=True),
    )
    note = "You et al. 2019, Algorithm 2"

    @classmethod
    def init_state(cls, param: Tensor, hyper: Hyper) -> dict[str, Tensor]:
        return {
            "step": new_step_count(),
            "exp_avg": zeros(param),
            "exp_avg_sq": zeros(param),
        }

    @classmethod
    def flags(cls, hyper: Hyper, param: Tensor) -> Flags:
        return {"decay": hyper["weight_decay"] != 0, "skip": hyper["skip_1d"] and param.ndim <= 1}

    @classmethod
    def scalars(cls, hyper: Hyper, step: float) -> dict[str, float]:
        return {
            **moment_scalars(hyper, step),
            "weight_decay": hyper["weight_decay"],
            "coeff": -hyper["lr"],
        }

    @classmethod
    def pointwise(cls, param, grad, state, s, flags, advance):
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if advance:
            advance_moments(exp_avg, exp_avg_sq, grad, s)
        ratio = exp_avg / (exp_avg_sq.sqrt() + s["eps"]) * s["correction"]
        if flags["decay"]:
            ratio = ratio + param * s["weight_decay"]
        if flags["skip"]:
            return ratio, s["coeff"]
        weight_norm, ratio_norm = norm(param), norm(ratio)
        valid = (weight_norm > 0) & (ratio_norm > 0)
        trust = torch.where(valid, weight_norm / ratio_norm, 1.0).to(s["coeff"])
        return ratio, trust * s["coeff"]

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
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        steps = step_counts(states, advance)
        if advance:
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)

        correction2 = [sqrt(1 - beta2**step) for step in steps]
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denominators, [eps * c for c in correction2])
        ratios = torch._foreach_div(exp_avgs, denominators)
        del denominators
        torch._foreach_mul_(ratios, [c2 / (1 - beta1**t) for c2, t in zip(correction2, steps)])
        if weight_decay != 0:
            torch._foreach_add_(ratios, params, alpha=weight_decay)

        weight_norms = norms(params)
        ratio_norms = norms(ratios)
        trust = trust_ratios(
            weight_norms / ratio_norms,
            (weight_norms > 0) & (ratio_norms > 0),
            params,
            hyper["skip_1d"],
        )
        return Update(ratios, torch._foreach_mul(trust, -lr))
