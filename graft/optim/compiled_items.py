"""One tensor of a compiled step, as data: what the graph path (compiled.py) and the native
loops (graft/optim/native) both take.

A param group's M and D are `Role`s (rule and full hyperparameters); for one tensor a role
is a `Side` (the rule, the names of its scalars, its flags for that tensor: constants a
graph specializes on); an `Item` is one tensor's flat views, sides and step counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor

from graft.optim import spec as specs
from graft.optim.rules.base import Rule


class Side(NamedTuple):
    """M or D for one tensor: the rule, the names of its scalars, and its flags as
    (name, value) pairs (hashable: a graph specializes on them)."""

    rule: type[Rule]
    names: tuple[str, ...]
    flags: tuple[tuple[str, bool], ...]  # dict(flags) is the rule's `flags`


@dataclass
class Role:
    """M or D in one param group: the rule and its full hyperparameters (M's with lr), the
    names of its scalars and the state a tensor holds once it has stepped."""

    rule: type[Rule]
    hyper: dict[str, Any]
    names: tuple[str, ...]
    keys: set[str]

    @classmethod
    def of(cls, spec: dict[str, Any], lr: float | None = None) -> Role:
        rule = specs.rule_of(spec)
        hyper = dict(spec) if lr is None else {**spec, "lr": lr}
        return cls(rule, hyper, tuple(rule.scalars(hyper, 1.0)), rule.state_keys(hyper))

    def side(self, param: Tensor) -> Side:
        return Side(self.rule, self.names, tuple(self.rule.flags(self.hyper, param).items()))

    def scalars(self, step: float | None) -> dict[str, float]:
        """The rule's scalars at `step` (1 for a rule without a step count)."""
        return self.rule.scalars(self.hyper, 1.0 if step is None else step)


@dataclass
class Item:
    """One tensor's arguments to the graphs or the native loops: flat views of its weight,
    gradient and states, its roles and sides, its step counts and eps. `m_packed` /
    `d_packed` (the graphs' scalars) and `m_at` / `d_at` (the step counts at this step)
    are set once the step counts advanced. `parameter` is the parameter itself (what
    StepNorms names); `native`: stepped by the native loops rather than a graph."""

    parameter: Tensor
    param: Tensor
    grad: Tensor
    m_state: dict[str, Tensor]
    d_state: dict[str, Tensor]
    m_role: Role
    d_role: Role | None
    magnitude: Side
    direction: Side | None
    steps: tuple[Tensor | None, Tensor | None]
    eps: float
    m_packed: Tensor | None = None
    d_packed: Tensor | None = None
    m_at: float | None = None
    d_at: float | None = None
    native: bool = False
