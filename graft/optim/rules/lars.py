"""LARS: layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017, Algorithm 1)."""

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
    norm,
    trust_ratios,
    zeros,
)
from graft.optim.update import Update, norms


class LARS(Rule):
    """Per tensor w with gradient g (You et al. 2017, arXiv 1708.03888, Algorithm 1):

        λ  = η · ‖w‖ / (‖g‖ + wd·‖w‖ + eps)      local (trust) learning rate
        b ← μ·b + lr·λ·(g + wd·w)                 momentum on the scaled step
        u  = -b                                   (without momentum: u = -lr·λ·(g + wd·w))

    η is `trust_coefficient`. λ = 1 where ‖w‖ or ‖g‖ is 0, and, with `skip_1d` (the
    default), for tensors of at most one dimension (biases, norm scales), which then
    take plain momentum SGD steps.
    """

    name = "lars"
    takes_norms = True  # the trust ratio ‖w‖ / ‖g‖
    defaults = {
        "lr": 1.0,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "trust_coefficient": 1e-3,
        "eps": 1e-8,
        "skip_1d": True,
    }
    constraints = {
        "momentum": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "trust_coefficient": POSITIVE,
        "eps": POSITIVE,
    }
    setting = {"lr": 1.0, "weight_decay": 1e-4, "trust_coefficient": 0.01}
    variants = (
        Variant({"lr": 2.0, "momentum": 0.9, "weight_decay": 0.01, "trust_coefficient": 0.02}),
        Variant(
            {
                "lr": 2.0,
                "momentum": 0.9,
                "weight_decay": 0.01,
                "trust_coefficient": 0.02,
                "skip_1d": False,
            }
        ),
        Variant({"lr": 2.0, "momentum": 0.0, "trust_coefficient": 0.02}),
        Variant({"lr": 0.1, "momentum": 0.0, "skip_1d": False}, compiled=True),
    )
    note = "You, Gitman, Ginsburg 2017, Algorithm 1"

    @classmethod
    def init_state(cls, param: Tensor, hyper: Hyper) -> dict[str, Tensor]:
        if hyper["momentum"] == 0:
            return {}
        return {"momentum_buffer": zeros(param)}

    @classmethod
    def flags(cls, hyper: Hyper, param: Tensor) -> Flags:
        return {
            "momentum": hyper["momentum"] != 0,
            "decay": hyper["weight_decay"] != 0,
            "skip": hyper["skip_1d"] and param.ndim <= 1,
        }

    @classmethod
    def scalars(cls, hyper: Hyper, step: float) -> dict[str, float]:
        return {
            "lr": hyper["lr"],
            "coeff": -hyper["lr"],
            "momentum": hyper["momentum"],
            "weight_decay": hyper["weight_decay"],
            "trust_coefficient": hyper["trust_coefficient"],
            "eps": hyper["eps"],
        }

    @classmethod
    def pointwise(cls, param, grad, state, s, flags, advance):
        momentum = flags["momentum"]
        if momentum and not advance:
            return state["momentum_buffer"], -torch.ones_like(s["lr"])
        if flags["skip"]:
            trust = torch.ones_like(s["lr"])
        else:
            weight_norm, grad_norm = norm(param), norm(grad)
            ratio = s["trust_coefficient"] * weight_norm
            ratio = ratio / (grad_norm + s["weight_decay"] * weight_norm + s["eps"])
            trust = torch.where((weight_norm > 0) & (grad_norm > 0), ratio, 1.0).to(s["lr"])
        grad = effective_grad(param, grad, s, False, flags["decay"])
        if not momentum:
            return grad, trust * s["coeff"]
        buffer = state["momentum_buffer"]
        buffer.mul_(s["momentum"]).add_(grad * (trust * s["lr"]))
        return buffer, -torch.ones_like(s["lr"])

    @classmethod
    def step(
        cls,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        hyper: Hyper,
        advance: bool,
    ) -> Update:
        lr, momentum, weight_decay = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        if momentum != 0 and not advance:
            return Update([state["momentum_buffer"] for state in states], -1.0)

        weight_norms = norms(params)
        grad_norms = norms(grads)
        trust = trust_ratios(
            hyper["trust_coefficient"]
            * weight_norms
            / (grad_norms + weight_decay * weight_norms + hyper["eps"]),
            (weight_norms > 0) & (grad_norms > 0),
            params,
            hyper["skip_1d"],
        )
        grads, _ = effective_grads(params, grads, weight_decay, maximize=False)
        if momentum == 0:
            return Update(grads, torch._foreach_mul(trust, -lr))

        buffers = [state["momentum_buffer"] for state in states]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_addcmul_(buffers, grads, torch._foreach_mul(trust, lr))
        return Update(buffers, -1.0)
