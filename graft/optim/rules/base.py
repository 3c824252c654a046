"""What every built-in rule is: hyperparameters, state, and a step over lists of tensors.

A rule is the update math of one base optimizer, written torch.optim style as plain
functions over lists of tensors (``torch._foreach_*``). It never touches the weights:
`step` advances the rule's state and returns the update it *would* apply, so Graft can
measure both optimizers' steps at the same weights before anything moves.

Each rule also spells the same math for one tensor (`pointwise`), with every float a
0-d tensor and every choice a flag: the form `torch.compile` fuses into one pass over
memory (graft/optim/compiled.py). Step counts and the coefficients that depend on them
are computed on the host in double precision (`scalars`), as the foreach form does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from graft.common.validation import NON_NEGATIVE, Allowed, first_refused, pair_of, within
from graft.optim.update import Update

Hyper = dict[str, Any]
Flags = dict[str, bool]


BETAS = pair_of(within(0, 1, open_high=True))  # Adam's and LAMB's moment decay rates


@dataclass(frozen=True)
class Variant:
    """Keywords a rule is tested with (the rest at their defaults).

    Every variant is held to the rule's torch.optim counterpart (`Rule.reference_class`)
    or, where that is None, to a reference written from the paper's formulas
    (tests/test_rules_match_torch.py, tests/test_rules_reference.py). `compiled`: the
    compiled step traces it too (tests/test_compiled.py); each costs a compilation, so
    only the variants that reach a branch or scalar the others leave off.
    """

    keywords: Hyper
    compiled: bool = False


class Rule:
    """Base class of the built-in rules; subclasses only define class methods.

    name: the spec name ("adam").
    defaults: every keyword the rule takes and its default, matching the torch.optim
        namesake where there is one.
    constraints: allowed values of the keywords that have limits (lr >= 0 for all).
    torch_class: the torch.optim class with exactly this math, if any: the black-box
        path steps it, and the tests hold the rule to it.

    What the tests and the README's rule table read (the registry drives them, so a new
    rule lists them here and nowhere else):
    setting: typical keywords, as the paper (or the rule's authors) would run it; the
        tests of every pair of rules take these (tests/test_graft.py: SPECS).
    variants: keyword sets that reach every branch and scalar of the rule's math.
    note: the README's rule table note, if any.
    """

    name: ClassVar[str]
    defaults: ClassVar[Hyper]
    constraints: ClassVar[dict[str, Allowed]] = {}
    torch_class: ClassVar[type[torch.optim.Optimizer] | None] = None
    setting: ClassVar[Hyper]
    variants: ClassVar[tuple[Variant, ...]]
    note: ClassVar[str] = ""

    @classmethod
    def check(cls, hyper: Hyper, where: str) -> None:
        """Raise ValueError (one line: value, what is allowed) for a bad hyperparameter."""
        limits = {"lr": NON_NEGATIVE, **cls.constraints}
        key = first_refused(hyper, limits)
        if key is not None:
            raise ValueError(
                f"invalid {key}={hyper[key]!r} for '{cls.name}' in {where}; "
                f"allowed: {limits[key].of(key)}"
            )

    @classmethod
    def reference_class(cls, hyper: Hyper) -> type[torch.optim.Optimizer] | None:
        """The torch.optim class that computes exactly this rule with these values, if any."""
        return cls.torch_class

    # Whether `pointwise` takes norms of whole tensors (LARS's and LAMB's trust ratios): its
    # graphs then cannot step a shard of a tensor (graft/optim/sharded.py steps it instead).
    takes_norms = False

    @classmethod
    def init_state(cls, param: Tensor, hyper: Hyper) -> dict[str, Tensor]:
        """Fresh per-parameter state (called once, at the parameter's first step)."""
        return {}

    @classmethod
    def state_keys(cls, hyper: Hyper) -> set[str]:
        """The state a tensor holds once it has taken its first step."""
        return set(cls.init_state(torch.empty(0, device="meta"), hyper))

    @classmethod
    def flags(cls, hyper: Hyper, param: Tensor) -> Flags:
        """The choices `pointwise` branches on, by name (a compiled graph per distinct
        value); they may depend on the tensor through its number of dimensions only. The
        names are the same whatever the values: the native loops read them by name."""
        return {}

    @classmethod
    def scalars(cls, hyper: Hyper, step: float) -> dict[str, float]:
        """The floats `pointwise` reads at this step (after the step count advanced), by
        name; the names are the same whatever the values (the native loops read them by
        name, graft/optim/native)."""
        return {}

    @classmethod
    def pointwise(
        cls,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        s: dict[str, Tensor],
        flags: Flags,
        advance: bool,
    ) -> tuple[Tensor, Tensor]:
        """`step` for one tensor as traceable math: (tensor, coefficient), the update being
        their product. State is advanced in place when `advance`; the step count is not
        (the caller advances it before computing `scalars`).

        s: `scalars` as 0-d tensors of the update's precision; flags: `flags`.
        """
        raise NotImplementedError

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


Count = float | Tensor  # a step count, or a coefficient computed from one


def step_counts(states: list[dict[str, Tensor]], advance: bool) -> list[Count]:
    """Each tensor's step count (after incrementing it, when advancing).

    Floats read on the host, so the coefficients computed from them are python doubles.
    Under torch.compile (a caller's `torch.compile(opt.step)`), 0-d fp64 tensors instead:
    Dynamo then traces the same double-precision arithmetic into the graph, where
    `.item()` would break it (torch.optim's own steps do the same when compiling).
    """
    steps = [state["step"] for state in states]
    if advance:
        torch._foreach_add_(steps, 1)
    if torch.compiler.is_compiling():
        return [step.to(torch.float64) for step in steps]
    return [step.item() for step in steps]


def traced_lr(lr: float) -> Count:
    """The lr a rule computes with: the float itself, or under torch.compile a 0-d fp64
    tensor made from it by tensor arithmetic. Dynamo bakes a float handed to a foreach
    op into the graph, so a scheduler's next lr would recompile the step (as
    torch.optim.SGD's does); a tensor's value is an input of the graph instead."""
    if torch.compiler.is_compiling():
        return torch.ones((), dtype=torch.float64) * lr
    return lr


def add_scaled_(targets: list[Tensor], tensors: list[Tensor], alpha: Count) -> None:
    """targets[i] += alpha · tensors[i], in place, for a float or a traced (0-d) alpha."""
    if isinstance(alpha, Tensor):
        torch._foreach_add_(targets, torch._foreach_mul(tensors, alpha))
    else:
        torch._foreach_add_(targets, tensors, alpha=alpha)


def sqrt(value: Count) -> Count:
    """√value of a host float or of a traced count (see `step_counts`)."""
    return value.sqrt() if isinstance(value, Tensor) else math.sqrt(value)


def effective_grad(param: Tensor, grad: Tensor, s: dict[str, Tensor], maximize: bool, decay: bool):
    """`effective_grads` for one tensor, in `pointwise` form."""
    if maximize:
        grad = -grad
    if decay:
        grad = grad + s["weight_decay"] * param
    return grad


def norm(tensor: Tensor) -> Tensor:
    """‖t‖₂ accumulated in at least fp32, in `pointwise` form."""
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    return torch.linalg.vector_norm(tensor, dtype=dtype)


def zeros(param: Tensor) -> Tensor:
    """A state tensor shaped, typed and laid out like its parameter, as torch.optim makes them."""
    return torch.zeros_like(param, memory_format=torch.preserve_format)


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
