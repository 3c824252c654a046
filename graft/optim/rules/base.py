"""What every built-in rule is: hyperparameters, state, and a step over lists of tensors.

A rule is the update math of one base optimizer, written torch.optim style as plain
functions over lists of tensors (``torch._foreach_*``). It never touches the weights:
`step` advances the rule's state and returns the update it *would* apply, so Graft can
measure both optimizers' steps at the same weights before anything moves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from graft.optim.update import Update

Hyper = dict[str, Any]


class Rule:
    """Base class of the built-in rules; subclasses only define class methods.

    name: the spec name ("adam").
    defaults: every keyword the rule takes and its default, matching the torch.optim
        namesake where there is one.
    torch_class: the torch.optim class with exactly this math, if any; the generic
        (black-box) path uses it as the reference implementation.
    """

    name: ClassVar[str]
    defaults: ClassVar[Hyper]
    torch_class: ClassVar[type[torch.optim.Optimizer] | None] = None

    @classmethod
    def check(cls, hyper: Hyper, where: str) -> None:
        """Raise ValueError (one line: value, what is allowed) for a bad hyperparameter."""
        check_range(cls.name, where, "lr", hyper["lr"], lambda v: v >= 0, "lr >= 0")

    @classmethod
    def reference_class(cls, hyper: Hyper) -> type[torch.optim.Optimizer] | None:
        """The torch.optim class that computes exactly this rule with these values, if any."""
        return cls.torch_class

    @classmethod
    def init_state(cls, param: Tensor, hyper: Hyper) -> dict[str, Tensor]:
        """Fresh per-parameter state (called once, at the parameter's first step)."""
        return {}

    @classmethod
    def step(
        cls,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        hyper: Hyper,
        advance: bool,
    ) -> Update:
        """The update this rule would add to `params` at this step.

        params, grads, states: same length, one entry per tensor, all on one device and
            of one dtype. Neither params nor grads are modified.
        advance: True at the step's first query: move the state forward (momentum,
            moments, step count). False: recompute the same update from the state already
            advanced this step (Graft's second pass under global granularity).
        """
        raise NotImplementedError


def check_range(
    rule: str, where: str, key: str, value: Any, ok: Callable[[Any], bool], allowed: str
) -> None:
    """Raise ValueError naming the bad value when `ok(value)` is false."""
    try:
        good = bool(ok(value))
    except TypeError:
        good = False
    if not good:
        raise ValueError(f"invalid {key}={value!r} for '{rule}' in {where}; allowed: {allowed}")


def check_betas(rule: str, where: str, betas: Any) -> None:
    check_range(
        rule,
        where,
        "betas",
        betas,
        lambda b: len(b) == 2 and all(0.0 <= x < 1.0 for x in b),
        "two values, each in [0, 1)",
    )


def positive(value: Any) -> bool:
    return value > 0


def non_negative(value: Any) -> bool:
    return value >= 0


def in_unit_interval(value: Any) -> bool:
    return 0 <= value < 1


def step_counts(states: list[dict[str, Tensor]], advance: bool) -> list[float]:
    """Each tensor's step count (after incrementing it, when advancing)."""
    steps = [state["step"] for state in states]
    if advance:
        torch._foreach_add_(steps, 1)
    return [step.item() for step in steps]


def new_step_count() -> Tensor:
    """A step counter as torch.optim keeps it: a 0-d float32 tensor on the CPU."""
    return torch.tensor(0.0, dtype=torch.float32)


def effective_grads(
    params: list[Tensor], grads: list[Tensor], weight_decay: float, maximize: bool
) -> tuple[list[Tensor], bool]:
    """The gradient the rule sees: negated when maximizing, plus L2 weight decay.

    Returns the tensors and whether they are fresh temporaries (False: the grads
    themselves, to be read only).
    """
    owned = False
    if maximize:
        grads = torch._foreach_neg(grads)
        owned = True
    if weight_decay != 0:
        if owned:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
            owned = True
    return grads, owned


def trust_ratios(
    ratios: Tensor, valid: Tensor, params: list[Tensor], skip_1d: bool
) -> list[Tensor]:
    """Per-tensor trust ratios: `ratios` where `valid`, else 1; also 1 for tensors of at
    most one dimension when `skip_1d`.

    ratios, valid: fp32 and bool vectors, one entry per tensor in `params`.
    """
    ratios = list(torch.where(valid, ratios, 1.0).unbind())
    if skip_1d:
        one = ratios[0].new_ones(())
        ratios = [ratio if param.ndim > 1 else one for ratio, param in zip(ratios, params)]
    return ratios
