"""Graft: the magnitude of one optimizer's step with the direction of another's (M#D).

At every step both optimizers see the same weights w and gradient g and both of their
states advance. With u_M and u_D the steps they would take, Graft applies

    u = ‖u_M‖ / (‖u_D‖ + eps) · u_D

per tensor (granularity "tensor", the paper's layer-wise grafting) or with both norms
taken over all tensors (granularity "global"). Agarwal, Anil, Hazan, Koren, Zhang,
"Disentangling Adaptive Gradient Methods from Learning Rates", arXiv 2002.11803, Alg. 2.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from graft.optim import spec as specs
from graft.optim.black_box import BlackBoxStep
from graft.optim.combine import grafting_ratio
from graft.optim.compiled import CompiledStep
from graft.optim.rules import RULES
from graft.optim.rules.base import traced_lr
from graft.optim.sharded import sharded_step
from graft.optim.shards import Sharding, is_sharded, local, sharding
from graft.optim.update import StepNorms, apply_update, update_norms

GRANULARITIES = ("tensor", "global")

# Tensors are processed in chunks of about this many elements, so a step's temporaries
# stay a few chunks in size whatever the model's size (a larger tensor is its own chunk).
CHUNK_NUMEL = 1 << 20

# Every built-in rule's keywords: a group key among them that neither M nor D takes is a
# hyperparameter sent to the wrong optimizer, not a tag, and is refused.
RULE_KEYWORDS = set().union(*(rule.defaults for rule in RULES.values()))


class Graft(torch.optim.Optimizer):
    """A torch optimizer that grafts M's step magnitude onto D's step direction.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer. A group may
            set `lr` (M's learning rate), `eps`, `maximize`, any keyword of M or D (e.g.
            `weight_decay=0.0` for biases: applied to whichever of M and D names it), or
            `magnitude={...}` / `direction={...}` to override one of them alone. Any other
            key (a tag such as Lightning's "name", a scheduler's "initial_lr") stays in the
            group as is: no built-in rule reads it, and the black-box path's inner
            optimizers get it in their groups (a flag such as Muon's "use_muon"); only a
            built-in rule's keyword that neither M nor D takes is refused (a
            hyperparameter sent to the wrong optimizer).
            An optimizer class taking **kwargs gets only the keywords it names from here.
        magnitude: M's spec, e.g. ``{"name": "adam", "lr": 1e-3}``: a built-in rule by
            name (graft.optim.RULES; torch.optim's keywords and defaults), or any other
            torch optimizer by dotted path or class. A class is stored as the dotted path
            it imports from ("torch.optim.NAdam"), so the state_dict holds no class and
            loads with `torch.load(weights_only=True)` (a class defined in a function,
            which no path imports, stays a class).
        direction: D's spec, or None for plain M. D's lr cancels in the normalisation.
            A direction identical to the magnitude (lr included) is plain M.
        granularity: "tensor" (one ratio per tensor) or "global" (one over all tensors).
        eps: added to ‖u_D‖, so u_D = 0 gives a zero step.
        maximize: both M and D step on -g (torch's `maximize`, for any pair, whether or
            not an optimizer has a maximize keyword; a spec's own maximize flips its
            gradient once more).
        black_box: force the black-box path (graft/optim/black_box.py: step each whole
            optimizer on a copy of the weights and measure), which any torch optimizer
            takes and built-in rules only need as a reference for the eager path.
        black_box_fp64: the black-box path's grafted pairs step fp64 copies of the weights
            and gradients, so a step far below the weights' ulp is measured exactly. False:
            copies in the weights' dtype, about a third of the time and a quarter of the
            transient memory, but an element's step below half its weight's ulp is lost
            (docs/graft_api.md, "Precision of the black-box path").
        compile: the compiled path (graft/optim/compiled.py): the same results to fp32
            rounding, each tensor's step fused into two loops over memory, from the second
            step on (the first, which creates the state, takes the eager path). SGD, Adam,
            AdamW and AdaGrad on the CPU take hand-written loops (built once per machine),
            the rest torch.compile's graphs; on a GPU, one graph for the whole step.
            Built-in rules only; where the step cannot be compiled, one warning and eager
            steps.
        foreach, fused, capturable, differentiable: torch.optim's implementation keywords,
            taken where they describe Graft's step (foreach None or True, fused None or
            False, the others False); any other value is a one-line ValueError.

    Otherwise built-in rules take the eager path (`_eager_step`: foreach kernels over
    chunks of tensors, no copy of the weights).

    Contract with torch:
    - The param groups' `lr` is M's learning rate, so LR schedulers scale the grafted step.
    - Likewise a group's `betas` (M in the Adam family, LAMB) or `momentum` (SGD, LARS,
      RMSprop, AdaGrad) is M's, present when M has one (`momentum_key`): what OneCycleLR
      and CyclicLR cycle, since M sets the step size they schedule. The group's key is
      authoritative: each step copies it into ``group["magnitude"]`` first. D's momentum
      stays as given (``group["direction"]``), on the ground that D only lends its
      direction; a pair whose D should cycle too writes ``group["direction"]`` itself.
    - A group's `weight_decay` is the value M and D (whichever take one) run at, present
      when they run one value: what LearningRateMonitor(log_weight_decay=True) logs and a
      weight-decay schedule writes. Each step copies it into every spec that takes it, as
      a `weight_decay` given when the group is made goes to each. Where M's and D's differ
      (set apart through ``magnitude={...}`` / ``direction={...}``) the group has none.
    - Global step hooks (`torch.optim.optimizer.register_optimizer_step_pre_hook`, post)
      fire once per step, for the Graft: the black-box path's inner optimizers step
      without them.
    - `copy.deepcopy` and pickling keep Graft's own attributes, so a copy steps bit for
      bit as the original; the black-box inner optimizers and the compiled graphs are
      rebuilt at its first step (and the inner optimizers after load_state_dict too); a
      compile that failed stays failed in the copy, which steps eagerly without a retry.

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
        maximize: bool = False,
        black_box: bool = False,
        black_box_fp64: bool = True,
        compile: bool = False,  # noqa: A002 - the name torch users expect
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {granularity!r}; allowed: {', '.join(GRANULARITIES)}"
            )
        check_eps(eps, "Graft")
        check_maximize(maximize, "Graft")
        check_torch_keywords(
            foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable
        )
        magnitude = specs.normalize(magnitude, "magnitude")
        direction = None if direction is None else specs.normalize(direction, "direction")
        if direction == magnitude:
            direction = None  # M#M is M: one state, one step, bit for bit
        lr = magnitude.pop("lr")
        builtin = specs.rule_of(magnitude) is not None and (
            direction is None or specs.rule_of(direction) is not None
        )
        self.black_box = black_box or not builtin
        if not isinstance(black_box_fp64, bool):
            raise ValueError(
                f"invalid black_box_fp64={black_box_fp64!r} for Graft; allowed: true or false"
            )
        self.black_box_fp64 = black_box_fp64
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
            "maximize": maximize,
        }
        momentum_key = specs.momentum_key(magnitude)
        if momentum_key is not None:  # M's, as lr is M's: what OneCycleLR and CyclicLR cycle
            value = momentum_value(momentum_key, specs.keyword_default(magnitude, momentum_key))
            magnitude[momentum_key] = defaults[momentum_key] = value
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups; Graft's own attributes come along.
        # The black-box inner optimizers and the compiled graphs are rebuilt at the next step;
        # a compile that failed here stays failed in the copy (no second attempt, no warning).
        return {
            **super().__getstate__(),
            "black_box": self.black_box,
            "black_box_fp64": self.black_box_fp64,
            "last_norms": self.last_norms,
            "compile": self._compiled is not None,
            "compile_failed": None if self._compiled is None else self._compiled.failed,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        compile = state.pop("compile", None)  # None: load_state_dict (state and groups only)
        compile_failed = state.pop("compile_failed", None)
        if not hasattr(self, "black_box_fp64"):  # unpickled from before the option existed
            state.setdefault("black_box_fp64", True)
        super().__setstate__(state)
        # Rebuilt from the groups as they are now: inner optimizers hold copies of them.
        self._black_box_step = None
        if compile is not None:
            self._compiled = CompiledStep(self.granularity) if compile else None
        if compile and compile_failed is not None:
            self._compiled.failed = compile_failed
        for group in self.param_groups:  # groups saved before these keys existed
            group.setdefault("maximize", False)
            key = self.momentum_key
            if key is not None and key not in group:
                group[key] = momentum_value(key, specs.keyword_default(group["magnitude"], key))
            if specs.WEIGHT_DECAY not in group:
                share_weight_decay(group)

    @property
    def granularity(self) -> str:
        return self.defaults["granularity"]

    @property
    def momentum_key(self) -> str | None:
        """The group key that holds M's momentum: "betas" (β1 first) or "momentum" (None:
        M has neither)."""
        return next((key for key in specs.MOMENTUM_KEYS if key in self.defaults), None)

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

        names = [str(spec["name"]) for spec in (magnitude, direction) if spec is not None]
        for key in [key for key in group if key not in specs.GROUP_KEYS and key != "name"]:
            takers = [
                spec
                for spec in (magnitude, direction)
                if spec is not None and key in specs.declared_keywords(spec)
            ]
            if not takers and key in RULE_KEYWORDS:  # a hyperparameter no optimizer here takes
                refusers = (
                    f"neither {names[0]} nor {names[1]} takes"
                    if len(names) == 2
                    else f"{names[0]} does not take"
                )
                raise ValueError(
                    f"unknown param-group key {key!r} in {where}: a hyperparameter {refusers}; "
                    f"allowed: lr, eps, maximize, magnitude, direction, a keyword of "
                    f"{' or '.join(names)}, or a key no built-in rule has (kept in the group)"
                )
            if not takers:
                continue  # kept as is: a tag ("name"), a scheduler's "initial_lr", ...
            value = group.pop(key)
            for taker in takers:
                taker[key] = value
        for role, base in (("magnitude", magnitude), ("direction", direction)):
            override = group.pop(role, None)
            if not override:
                continue
            name = override.get("name", base["name"]) if base is not None else None
            if inspect.isclass(name):
                name = specs.import_path(name)  # as the base spec stores it
            if base is None or name != base["name"]:
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
        group["maximize"] = group.get("maximize", self.defaults["maximize"])
        check_maximize(group["maximize"], where)
        group["granularity"] = self.granularity
        key = self.momentum_key
        if key is not None:
            value = momentum_value(key, specs.keyword_default(group["magnitude"], key))
            group[key] = group["magnitude"][key] = value
        for spec in (group["magnitude"], group["direction"]):
            if spec is not None and specs.takes_number(spec, specs.WEIGHT_DECAY):
                # Explicit, so that the spec holding the key is what takes the group's value.
                spec[specs.WEIGHT_DECAY] = specs.keyword_default(spec, specs.WEIGHT_DECAY)
        share_weight_decay(group)
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
        key = self.momentum_key
        for group in self.param_groups:  # the group's keys are authoritative (schedulers write)
            if key is not None:
                group["magnitude"][key] = momentum_value(key, group[key])
            if specs.WEIGHT_DECAY in group:
                for spec in weight_decay_takers(group):
                    spec[specs.WEIGHT_DECAY] = group[specs.WEIGHT_DECAY]
        negated = self._negate_maximized_grads()
        try:
            if self.black_box:
                if self._black_box_step is None or not self._black_box_step.matches(self):
                    self._black_box_step = BlackBoxStep(self)
                self.last_norms = self._black_box_step.step()
            else:
                norms = None if self._compiled is None else self._compiled.step(self)
                if norms is None:  # FSDP2's DTensors: on this rank's shards
                    norms = sharded_step(self) if is_sharded(self) else self._eager_step()
                self.last_norms = norms
        finally:
            for grad in negated:
                grad.neg_()
        return loss

    def _negate_maximized_grads(self) -> list[Tensor]:
        """Negate, in place, the gradients of groups that maximize: both M and D then see
        -g, on every path (negation is exact, and undone after the step)."""
        negated: dict[int, Tensor] = {}  # by identity: a gradient shared by two tensors once
        for group in self.param_groups:
            if not group["maximize"]:
                continue
            for param in group["params"]:
                if param.grad is not None and id(param.grad) not in negated:
                    negated[id(param.grad)] = param.grad.neg_()
        return list(negated.values())

    def _eager_step(self) -> StepNorms:
        """The eager path: each rule's foreach `step` over chunks, then the grafted update."""
        grafting = self.grafting()
        norm_params: list[Tensor] = []
        magnitude_norms: list[Tensor] = []
        direction_norms: list[Tensor] = []
        second_pass = []  # global granularity: D's step is recomputed once all norms are known

        for group in self.param_groups:
            magnitude_rule = specs.rule_of(group["magnitude"])
            magnitude_hyper = {**group["magnitude"], "lr": traced_lr(group["lr"])}
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
        """The group's tensors that have a gradient, by device, dtype and sharding, in
        chunks of about CHUNK_NUMEL elements (of this rank's shards)."""
        buckets: dict[tuple[torch.device, torch.dtype, Sharding], list[Tensor]] = {}
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("Graft does not support sparse gradients")
            if param.is_complex():
                raise RuntimeError("Graft does not support complex parameters")
            buckets.setdefault((param.device, param.dtype, sharding(param)), []).append(param)
        for params in buckets.values():
            chunk: list[Tensor] = []
            numel = 0
            for param in params:
                if chunk and numel + local(param).numel() > CHUNK_NUMEL:
                    yield chunk
                    chunk, numel = [], 0
                chunk.append(param)
                numel += local(param).numel()
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


def weight_decay_takers(group: dict[str, Any]) -> list[dict[str, Any]]:
    """The group's specs that take a weight decay (each names it: `add_param_group`)."""
    return [
        spec
        for spec in (group["magnitude"], group["direction"])
        if spec is not None and specs.WEIGHT_DECAY in spec
    ]


def share_weight_decay(group: dict[str, Any]) -> None:
    """Set group["weight_decay"] to the one value M and D run (those that take one), as
    torch tools read it; absent where the two differ, or neither takes one."""
    values = {spec[specs.WEIGHT_DECAY] for spec in weight_decay_takers(group)}
    if len(values) == 1:
        group[specs.WEIGHT_DECAY] = values.pop()
    else:
        group.pop(specs.WEIGHT_DECAY, None)


def momentum_value(key: str, value: Any) -> Any:
    """A momentum as the rules take it: betas as a tuple (a scheduler may write a list)."""
    return tuple(value) if key == "betas" else value


def check_maximize(maximize: Any, where: str) -> None:
    if not isinstance(maximize, bool):
        raise ValueError(f"invalid maximize={maximize!r} for {where}; allowed: true or false")


# torch.optim's implementation keywords: the values that describe Graft's own step, and why
# the others cannot.
TORCH_KEYWORDS = {
    "foreach": ((None, True), "None or True (the eager step is foreach already)"),
    "fused": ((None, False), "None or False (compile=True fuses the step)"),
    "capturable": ((False,), "False (step counts are read on the host)"),
    "differentiable": ((False,), "False (the step is taken without autograd)"),
}


def check_torch_keywords(**given: Any) -> None:
    for key, value in given.items():
        allowed, why = TORCH_KEYWORDS[key]
        if not any(value is option for option in allowed):
            raise ValueError(f"invalid {key}={value!r} for Graft; allowed: {why}")


def check_eps(eps: Any, where: str) -> None:
    if not isinstance(eps, float | int) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"invalid eps={eps!r} for {where}; allowed: eps > 0")


def cat_on(vectors: list[Tensor], params: list[Tensor]) -> Tensor:
    """Concatenate per-chunk norm vectors on the first parameter's device."""
    if not vectors:
        return torch.zeros(0)
    device = params[0].device
    return torch.cat([vector.to(device) for vector in vectors])
