"""The black-box path: graft any two torch optimizers by stepping each and measuring.

When grafting, each step: M steps an fp64 copy of the weights w and of the gradient, and
u_M = w' - w is measured on it; D does the same from w and the gradient M saw; then
w ← w + ‖u_M‖/(‖u_D‖ + eps) · u_D, rounded once into the weights' dtype. The weights move
once, and a step far below a weight's ulp is measured (docs/graft_api.md, "Precision of the
black-box path"); between steps both optimizers' states are in their own layouts and dtypes.
Plain M steps the weights themselves, so it is the optimizer alone bit for bit. Correct for
any optimizer (it only sees what the optimizer did), at the price of the copies and two full
optimizer steps; Graft takes it for optimizers that are not built-in rules (or when asked:
`Graft(..., black_box=True)`), and the tests use it as the reference for the eager path.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from graft.optim import spec as specs
from graft.optim.combine import GraftLike, grafting_ratio
from graft.optim.shards import local, sharding, whole_squares
from graft.optim.update import StepNorms

# The Graft's param-group key under which the inner optimizers' own groups are kept, by role:
# some optimizers keep state there (a step count, an adapted scale), not per tensor.
INNER_GROUPS = "inner_groups"


def measuring_dtype(param: Tensor, fp64: bool) -> torch.dtype:
    """The dtype a grafted pair's steps are taken and measured in: fp64 (fp32 weights: the
    rounding of w' = w + u then costs u about 2^-53 |w|, where fp32 would cost 2^-24 |w| and
    lose a step below half an ulp outright), or the weights' own where `fp64` is False or
    the device has no fp64 (MPS). fp64 also tells the state an optimizer makes like its
    tensor (fp64, stored back in the weights' dtype) from what it makes in a dtype of its
    own (a step count in fp32)."""
    if not fp64 or not param.is_floating_point() or param.device.type == "mps":
        return param.dtype
    return torch.float64


class BlackBoxStep:
    """Two whole optimizers (M and D) over a Graft's param groups, sharing its state.

    Each inner optimizer keeps its per-tensor state in the Graft's own state dict
    (``graft.state[p]["magnitude"]`` / ``["direction"]``), what it keeps in its param
    groups (pytorch-optimizer's step counts, Prodigy's d) in the Graft's groups under
    INNER_GROUPS, and state under keys that are not tensors (MADGRAD's "k") as the Graft's
    ``state["magnitude/k"]``: state_dict, load_state_dict and copies of the Graft cover all.
    """

    def __init__(self, graft: GraftLike) -> None:
        self.graft = graft
        self.group_count = len(graft.param_groups)
        self.magnitude = inner_optimizer(graft, "magnitude")
        self.direction = inner_optimizer(graft, "direction") if graft.grafting() else None
        self.momentum_key = specs.momentum_key(graft.param_groups[0]["magnitude"])

    def matches(self, graft: GraftLike) -> bool:
        return graft is self.graft and len(graft.param_groups) == self.group_count

    # torch.compile(Graft.step) steps this path eagerly: it swaps the tensors the inner
    # optimizers step and converts their state, which would break and recompile the graph
    # at every turn (14 graphs, 13 breaks for NAdam#SGD).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self) -> StepNorms:
        graft = self.graft
        grafting = graft.grafting()
        params, eps = [], []
        for index, group in enumerate(graft.param_groups):
            # M's lr and momentum and both weight decays follow the Graft's (its schedulers')
            inner_group = self.magnitude.optimizer.param_groups[index]
            inner_group["lr"] = group["lr"]
            follow(inner_group, group["magnitude"], (self.momentum_key, specs.WEIGHT_DECAY))
            tags = specs.group_tags(group)  # as the optimizer alone would find them
            inner_group.update(tags)
            if grafting:
                inner_group = self.direction.optimizer.param_groups[index]
                follow(inner_group, group["direction"])
                inner_group.update(tags)
            for param in group["params"]:
                if param.grad is not None:
                    params.append(param)
                    eps.append(group["eps"])
        if not grafting:  # plain M steps the weights themselves: the optimizer alone
            start = [param.detach().clone() for param in params]
            self.magnitude.link(graft.state, "magnitude")
            step_unhooked(self.magnitude.optimizer)
            magnitude = measured_norms(params, start)
            self.save_inner_state()
            return StepNorms(params, magnitude, magnitude)

        # Each steps copies from the same weights and gradient (M may rewrite its gradient in
        # place: Ranger's gradient centralisation, GrokFast's filter); the weights move once.
        fp64 = graft.black_box_fp64
        moved = self.magnitude.step_copies(graft.state, "magnitude", params, fp64)
        magnitude = measured_norms(params, moved)
        del moved  # before D's copies are made
        moved = self.direction.step_copies(graft.state, "direction", params, fp64)
        direction = measured_norms(params, moved)

        eps_vector = torch.tensor(eps, dtype=magnitude.dtype, device=magnitude.device)
        if graft.granularity == "tensor":
            scales = grafting_ratio(magnitude, direction, eps_vector)
        else:
            scales = grafting_ratio(
                torch.linalg.vector_norm(magnitude), torch.linalg.vector_norm(direction), eps_vector
            )
        for param, copy, scale in zip(params, moved, scales.unbind()):
            shard, copy = local(param), local(copy)
            weight = shard.to(copy.dtype)
            shard.copy_(copy.sub_(weight).mul_(scale).add_(weight))  # w + s·u_D, rounded once
        self.save_inner_state()
        # StepNorms' dtype: fp32, fp64 for fp64 weights
        reported = torch.promote_types(params[0].dtype, torch.float32) if params else torch.float32
        return StepNorms(params, magnitude.to(reported), direction.to(reported))

    def save_inner_state(self) -> None:
        """Copy into the Graft what its inner optimizers keep outside the per-tensor state:
        their param groups (all but the tensors) and their state under other keys."""
        for role, inner in (("magnitude", self.magnitude), ("direction", self.direction)):
            if inner is None or inner.nested:
                continue
            for group, inner_group in zip(self.graft.param_groups, inner.optimizer.param_groups):
                saved = group.setdefault(INNER_GROUPS, {})
                saved[role] = {k: v for k, v in inner_group.items() if k != "params"}
            for key, value in inner.optimizer.state.items():
                if not isinstance(key, Tensor):
                    self.graft.state[f"{role}/{key}"] = value


class InnerOptimizer:
    """A whole optimizer over the Graft's params, and where its per-tensor state lives.

    optimizer: a torch.optim class where one computes the spec exactly, else a plain
        (direction-less) Graft of the built-in rule, on the eager path.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, nested: bool) -> None:
        self.optimizer = optimizer
        self.nested = nested  # an inner Graft keeps its rule's state under "magnitude"

    def link(
        self,
        graft_state: dict[Tensor, dict[str, Any]],
        role: str,
        copies: dict[Tensor, Tensor] | None = None,
    ) -> None:
        """Point the inner optimizer's per-tensor state at the Graft's, for every tensor
        (under its copy's key where `copies` has one: the tensor the optimizer steps)."""
        inner_state = self.optimizer.state
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                slot = graft_state[param]
                key = param if copies is None else copies.get(param, param)
                if self.nested:
                    inner_state[key]["magnitude"] = slot.setdefault(role, {})
                    continue
                # Optimizers that create state eagerly (Adagrad) hand it over at first link.
                if role not in slot:
                    slot[role] = inner_state.get(param, {})
                inner_state[key] = slot[role]
        if not self.nested:  # state under other keys, as save_inner_state keeps it
            prefix = f"{role}/"
            for key, value in graft_state.items():
                if isinstance(key, str) and key.startswith(prefix):
                    inner_state[key.removeprefix(prefix)] = value

    def step_copies(
        self,
        graft_state: dict[Tensor, dict[str, Any]],
        role: str,
        params: list[Tensor],
        fp64: bool,
    ) -> list[Tensor]:
        """One step of the inner optimizer on copies of `params` and of their gradients in
        the measuring dtype (`measuring_dtype`), the weights and gradients left as they are;
        returns the copies as the step left them (w + u). The state is stepped in that dtype
        too and stored back in the weights' (a state tensor it creates in fp64 is taken for
        one made like its tensor)."""
        copies = {}
        for param in params:
            copy = param.detach().to(measuring_dtype(param, fp64), copy=True)
            copy.grad = param.grad.detach().to(copy.dtype, copy=True)
            copies[param] = copy
        self.link(graft_state, role, copies)
        widened = {}  # per tensor: its state's keys before the step, and those widened
        for param in params:
            if copies[param].dtype != param.dtype:
                slot = graft_state[param][role]
                widened[param] = (set(slot), retyped(slot, param.dtype, copies[param].dtype))
        groups = self.optimizer.param_groups
        originals = [group["params"] for group in groups]
        for group in groups:
            group["params"] = [copies.get(param, param) for param in group["params"]]
        try:
            step_unhooked(self.optimizer)
        finally:
            for group, own in zip(groups, originals):
                group["params"] = own
            for copy in copies.values():
                self.optimizer.state.pop(copy, None)
                copy.grad = None
            for param, (before, keys) in widened.items():
                slot = graft_state[param][role]
                back = keys | (set(slot) - before)  # what was widened, and what is new
                retyped(slot, copies[param].dtype, param.dtype, back)
        return [copies[param] for param in params]


def retyped(
    state: dict[str, Any], old: torch.dtype, new: torch.dtype, keys: set[str] | None = None
) -> set[str]:
    """Cast, in place, the tensors of dtype `old` in `state` (under `keys`; in lists,
    tuples and dicts too) to `new`; returns the keys that held one."""
    changed = set()
    for key in list(state) if keys is None else keys & state.keys():
        value, found = cast(state[key], old, new)
        if found:
            state[key] = value
            changed.add(key)
    return changed


def cast(value: Any, old: torch.dtype, new: torch.dtype) -> tuple[Any, bool]:
    if isinstance(value, Tensor):
        return (value.to(new), True) if value.dtype == old else (value, False)
    if isinstance(value, list | tuple):
        items = [cast(item, old, new) for item in value]
        found = any(item_found for _, item_found in items)
        return (type(value)(item for item, _ in items) if found else value), found
    if isinstance(value, dict):
        items = {key: cast(item, old, new) for key, item in value.items()}
        found = any(item_found for _, item_found in items.values())
        return ({key: item for key, (item, _) in items.items()} if found else value), found
    return value, False


def inner_optimizer(graft: GraftLike, role: str) -> InnerOptimizer:
    graft_groups = graft.param_groups
    first = graft_groups[0][role]
    rule = specs.rule_of(first)
    cls = specs.optimizer_class(first["name"], role) if rule is None else None
    if rule is not None:
        cls = rule.reference_class({k: v for k, v in first.items() if k != "name"})

    groups = []
    for group in graft_groups:
        hyper = {k: v for k, v in group[role].items() if k != "name"}
        if role == "magnitude":
            hyper["lr"] = group["lr"]
        groups.append({"params": group["params"], **hyper})
    tags = [specs.group_tags(group) for group in graft_groups]

    if cls is None:  # a built-in rule torch.optim lacks: a plain Graft of that rule
        inner = type(graft)(groups, magnitude={"name": first["name"], "lr": groups[0]["lr"]})
        return InnerOptimizer(inner, nested=True)
    accepted = specs.class_keywords(cls)
    if accepted is not None:
        groups = [
            {k: v for k, v in group.items() if k == "params" or k in accepted} for group in groups
        ]
    first_group = {k: v for k, v in groups[0].items() if k != "params"}
    # Tags and flags go in the groups, as the optimizer alone would be given them.
    optimizer = cls([{**group, **tag} for group, tag in zip(groups, tags)], **first_group)
    for group, inner_group in zip(graft_groups, optimizer.param_groups):
        inner_group.update(group.get(INNER_GROUPS, {}).get(role, {}))  # as they were saved
    return InnerOptimizer(optimizer, nested=False)


def follow(
    inner_group: dict[str, Any],
    spec: dict[str, Any],
    keys: tuple[str | None, ...] = ("weight_decay",),
) -> None:
    """Copy the spec's values of `keys` into an inner optimizer's group that has them."""
    for key in keys:
        if key in inner_group and key in spec:
            inner_group[key] = spec[key]


def step_unhooked(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step() without torch's global step hooks, which fire once per Graft.step,
    for the Graft alone: torch wraps each class's `step` in a function that runs the hooks
    (marked `hooked`); call the step it wraps."""
    step = type(optimizer).step
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    step(optimizer)


def measured_norms(params: list[Tensor], others: list[Tensor]) -> Tensor:
    """‖w' - w‖ per tensor between `params` and `others` (the weights before or after a
    step), in the wider of their dtypes and at least fp32; of the whole tensor for a sharded
    one (one all-reduce for all)."""
    if not params:
        return torch.zeros(0)
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in others], torch.float32)
    # One tensor at a time: a list of all differences would be a second copy of the model.
    norms = torch.stack(
        [
            torch.linalg.vector_norm(local(p).to(dtype) - local(w).to(dtype))
            for p, w in zip(params, others)
        ]
    )
    wheres = [sharding(param) for param in params]
    if not any(wheres):
        return norms
    return whole_squares(norms.square(), wheres).sqrt()
