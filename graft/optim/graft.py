"""Graft: the magnitude of one optimizer's step with the direction of another's (M#D).

At every step both optimizers see the same weights w and gradient g and both of their
states advance. With u_M and u_D the steps they would take, Graft applies

    u = ‖u_M‖ / (‖u_D‖ + eps) · u_D

per tensor (granularity "tensor", the paper's layer-wise grafting) or with both norms
taken over all tensors (granularity "global"). Agarwal, Anil, Hazan, Koren, Zhang,
"Disentangling Adaptive Gradient Methods from Learning Rates", arXiv 2002.11803, Alg. 2.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from graft.optim import spec as specs
from graft.optim.black_box import BlackBoxStep
from graft.optim.combine import grafting_ratio
from graft.optim.compiled import CompiledStep
from graft.optim.update import StepNorms, apply_update, update_norms

GRANULARITIES = ("tensor", "global")

# Tensors are processed in chunks of about this many elements, so a step's temporaries
# stay a few chunks in size whatever the model's size (a larger tensor is its own chunk).
CHUNK_NUMEL = 1 << 20

# Param-group keys Graft itself reads; any other key is a keyword for the optimizers.
GROUP_KEYS = ("params", "param_names", "lr", "magnitude", "direction", "eps", "granularity")


class Graft(torch.optim.Optimizer):
    """A torch optimizer that grafts M's step magnitude onto D's step direction.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer. A group may
            set `lr` (M's learning rate), `eps`, any keyword of M or D (e.g.
            `weight_decay=0.0` for biases: applied to whichever of M and D takes it), or
            `magnitude={...}` / `direction={...}` to override one of them alone.
        magnitude: M's spec, e.g. ``{"name": "adam", "lr": 1e-3}``: a built-in rule by
            name (graft.optim.RULES; torch.optim's keywords and defaults), or any other
            torch optimizer by dotted path or class.
        direction: D's spec, or None for plain M. D's lr cancels in the normalisation.
            A direction identical to the magnitude (lr included) is plain M.
        granularity: "tensor" (one ratio per tensor) or "global" (one over all tensors).
        eps: added to ‖u_D‖, so u_D = 0 gives a zero step.
        black_box: force the black-box path (graft/optim/black_box.py: step each whole
            optimizer, measure, restore), which any torch optimizer takes and built-in
            rules only need as a reference for the eager path.
        compile: the compiled path (graft/optim/compiled.py): the same results to fp32
            rounding, each tensor's step fused into two loops over memory, from the second
            step on (the first, which creates the state, takes the eager path). SGD, Adam,
            AdamW and AdaGrad on the CPU take hand-written loops (built once per machine),
            the rest torch.compile's graphs. Built-in rules only; where the step cannot be
            compiled, one warning and eager steps.

    Otherwise built-in rules take the eager path (`_eager_step`: foreach kernels over
    chunks of tensors, no copy of the weights).

    The param groups' `lr` is M's learning rate, so LR schedulers scale the grafted step.
    After each step, `last_norms` holds ‖u_M‖ and ‖u_D‖ per tensor, without a host sync.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        magnitude: Mapping[str, Any],
        direction: Mapping[str, Any] | None = None,
        granularity: str = "tensor",
        eps: float = 1e-16,
        *,
        black_box: bool = False,
        compile: bool = False,  # noqa: A002 - the name torch users expect
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {granularity!r}; allowed: {', '.join(GRANULARITIES)}"
            )
        check_eps(eps, "Graft")
        magnitude = specs.normalize(magnitude, "magnitude")
        direction = None if direction is None else specs.normalize(direction, "direction")
        if direction == magnitude:
            direction = None  # M#M is M: one state, one step, bit for bit
        lr = magnitude.pop("lr")
        builtin = specs.rule_of(magnitude) is not None and (
            direction is None or specs.rule_of(direction) is not None
        )
        self.black_box = black_box or not builtin
        self.last_norms: StepNorms | None = None
        self._black_box_step = None
        self._compiled = None
        if not isinstance(compile, bool):
            raise ValueError(f"invalid compile={compile!r} for Graft; allowed: true or false")
        if compile and self.black_box:
            reason = "black_box=True" if black_box else "a torch optimizer is not a built-in rule"
            warnings.warn(
                f"Graft(compile=True) compiles built-in rules only ({reason}); stepping eagerly",
                stacklevel=2,
            )
        elif compile:
            self._compiled = CompiledStep(granularity)
        defaults = {
            "lr": lr,
            "magnitude": magnitude,
            "direction": direction,
            "eps": eps,
            "granularity": granularity,
        }
        super().__init__(params, defaults)

    @property
    def granularity(self) -> str:
        return self.defaults["granularity"]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, folding its overrides into full magnitude and direction specs."""
        group = dict(param_group)
        where = f"param group {len(self.param_groups)}"
        if group.get("granularity", self.granularity) != self.granularity:
            raise ValueError(
                f"granularity={group['granularity']!r} in {where}; allowed: only the "
                f"optimizer's own ({self.granularity!r}), since 'global' spans all groups"
            )
        magnitude = dict(self.defaults["magnitude"])
        magnitude["lr"] = group.get("lr", self.defaults["lr"])
        direction = self.defaults["direction"]
        direction = None if direction is None else dict(direction)

        shared = {key: group.pop(key) for key in list(group) if key not in GROUP_KEYS}
        for key, value in shared.items():
            takers = [s for s in (magnitude, direction) if s is not None and accepts(s, key)]
            if not takers:
                raise ValueError(
                    f"unknown param-group key {key!r} in {where}; allowed: lr, eps, "
                    f"magnitude, direction, or a keyword of {magnitude['name']!s}"
                    + ("" if direction is None else f" or {direction['name']!s}")
                )
            for taker in takers:
                taker[key] = value
        for role, base in (("magnitude", magnitude), ("direction", direction)):
            override = group.pop(role, None)
            if not override:
                continue
            if base is None or override.get("name", base["name"]) != base["name"]:
                raise ValueError(
                    f"{role}={dict(override)!r} in {where} changes the optimizer; allowed: "
                    "keyword overrides of the optimizer the Graft was built with"
                )
            base.update(override)

        magnitude = specs.normalize(magnitude, f"magnitude ({where})")
        group["lr"] = magnitude.pop("lr")
        group["magnitude"] = magnitude
        group["direction"] = (
            None if direction is None else specs.normalize(direction, f"direction ({where})")
        )
        group["eps"] = group.get("eps", self.defaults["eps"])
        check_eps(group["eps"], where)
        group["granularity"] = self.granularity
        super().add_param_group(group)

    def grafting(self) -> bool:
        """Whether a direction is grafted on (False: plain M, including M#M)."""
        return self.defaults["direction"] is not None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.black_box:
            if self._black_box_step is None or not self._black_box_step.matches(self):
                self._black_box_step = BlackBoxStep(self)
            self.last_norms = self._black_box_step.step()
        else:
            norms = None if self._compiled is None else self._compiled.step(self)
            self.last_norms = self._eager_step() if norms is None else norms
        return loss

    def _eager_step(self) -> StepNorms:
        """The eager path: each rule's foreach `step` over chunks, then the grafted update."""
        grafting = self.grafting()
        norm_params: list[Tensor] = []
        magnitude_norms: list[Tensor] = []
        direction_norms: list[Tensor] = []
        second_pass = []  # global granularity: D's step is recomputed once all norms are known

        for group in self.param_groups:
            magnitude_rule = specs.rule_of(group["magnitude"])
            magnitude_hyper = {**group["magnitude"], "lr": group["lr"]}
            if grafting:
                direction_rule = specs.rule_of(group["direction"])
                direction_hyper = group["direction"]
            for params in self._chunks(group):
                grads = [param.grad for param in params]
                states = self._states(params, "magnitude", magnitude_rule, magnitude_hyper)
                update = magnitude_rule.step(params, grads, states, magnitude_hyper, advance=True)
                norms_m = update_norms(update)
                norm_params += params
                magnitude_norms.append(norms_m)
                if not grafting:
                    apply_update(params, update)
                    direction_norms.append(norms_m)
                    continue
                del update  # free M's temporaries before D makes its own

                states = self._states(params, "direction", direction_rule, direction_hyper)
                update = direction_rule.step(params, grads, states, direction_hyper, advance=True)
                norms_d = update_norms(update)
                direction_norms.append(norms_d)
                if self.granularity == "tensor":
                    scales = grafting_ratio(norms_m, norms_d, group["eps"])
                    apply_update(params, update, list(scales.unbind()))
                else:
                    second_pass.append((group, params, grads, states))
                del update

        magnitude = cat_on(magnitude_norms, norm_params)
        direction = cat_on(direction_norms, norm_params)
        if second_pass:
            total_m = torch.linalg.vector_norm(magnitude)
            total_d = torch.linalg.vector_norm(direction)
            for group, params, grads, states in second_pass:
                rule = specs.rule_of(group["direction"])
                update = rule.step(params, grads, states, group["direction"], advance=False)
                scale = grafting_ratio(total_m, total_d, group["eps"])
                apply_update(params, update, [scale] * len(params))
                del update
        return StepNorms(norm_params, magnitude, direction)

    def _chunks(self, group: dict[str, Any]) -> Iterator[list[Tensor]]:
        """The group's tensors that have a gradient, by device and dtype, in chunks."""
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("Graft does not support sparse gradients")
            if param.is_complex():
                raise RuntimeError("Graft does not support complex parameters")
            buckets.setdefault((param.device, param.dtype), []).append(param)
        for params in buckets.values():
            chunk: list[Tensor] = []
            numel = 0
            for param in params:
                if chunk and numel + param.numel() > CHUNK_NUMEL:
                    yield chunk
                    chunk, numel = [], 0
                chunk.append(param)
                numel += param.numel()
            if chunk:
                yield chunk

    def _states(self, params: list[Tensor], role: str, rule, hyper) -> list[dict[str, Tensor]]:
        """Each tensor's state for M or D, created at its first step."""
        states = []
        for param in params:
            state = self.state[param].setdefault(role, {})
            if not state:  # filled in place: the black-box path's inner optimizer may hold it
                state.update(rule.init_state(param, hyper))
            states.append(state)
        return states


def accepts(spec: Mapping[str, Any], key: str) -> bool:
    allowed = specs.keywords(spec)
    return allowed is None or key in allowed


def check_eps(eps: Any, where: str) -> None:
    if not isinstance(eps, float | int) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"invalid eps={eps!r} for {where}; allowed: eps > 0")


def cat_on(vectors: list[Tensor], params: list[Tensor]) -> Tensor:
    """Concatenate per-chunk norm vectors on the first parameter's device."""
    if not vectors:
        return torch.zeros(0)
    device = params[0].device
    return torch.cat([vector.to(device) for vector in vectors])
