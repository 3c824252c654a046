"""Optimizer specs: ``{"name": ..., **keywords}`` → a checked, fully filled-in dict.

A spec names a built-in rule ("adam") or any torch optimizer class, by dotted path
("torch.optim.NAdam") or as the class itself. Built-in specs get every keyword filled
with its default, so a param group records exactly what ran. A class is stored as the
dotted path it re-imports from, so a state_dict holds strings, not classes, and loads
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any

import torch

from graft.optim.rules import RULES, Rule

OptimizerClass = type[torch.optim.Optimizer]

ALLOWED_NAMES = ", ".join(RULES) + ", or a dotted path to a torch optimizer class"


def rule_of(spec: Mapping[str, Any]) -> type[Rule] | None:
    """The built-in rule a normalized spec names, or None for a torch optimizer class."""
    name = spec["name"]
    return RULES.get(name) if isinstance(name, str) else None


def optimizer_class(name: str | OptimizerClass, where: str) -> OptimizerClass:
    """Import a torch optimizer class from its dotted path (or pass a class through)."""
    if inspect.isclass(name):
        if issubclass(name, torch.optim.Optimizer):
            return name
        raise ValueError(
            f"{where} name {name!r} is not a torch.optim.Optimizer subclass; "
            f"allowed: {ALLOWED_NAMES}"
        )
    module_name, _, attribute = str(name).rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attribute) if module_name else None
    except (ImportError, AttributeError):
        found = None
    if not (inspect.isclass(found) and issubclass(found, torch.optim.Optimizer)):
        raise ValueError(f"unknown optimizer name {name!r} in {where}; allowed: {ALLOWED_NAMES}")
    return found


def import_path(cls: OptimizerClass) -> str | OptimizerClass:
    """The shortest dotted path that imports `cls` back ("torch.optim.NAdam"), or the class
    itself where none does (a class defined inside a function)."""
    module, qualname = cls.__module__, cls.__qualname__
    if "." in qualname or "<" in qualname:
        return cls
    parts = module.split(".")
    for end in range(1, len(parts) + 1):
        # Only modules already loaded: the class's own module is, and so are its parents.
        found = sys.modules.get(".".join(parts[:end]))
        if found is not None and getattr(found, qualname, None) is cls:
            return f"{'.'.join(parts[:end])}.{qualname}"
    return cls


def declared_keywords(spec: Mapping[str, Any]) -> set[str]:
    """Keywords the spec's optimizer names (a class's **kwargs names none)."""
    rule = rule_of(spec)
    if rule is not None:
        return set(rule.defaults)
    return set(class_defaults(optimizer_class(spec["name"], "spec")))


def keyword_default(spec: Mapping[str, Any], key: str) -> Any:
    """The value the spec's optimizer runs `key` at: the spec's, else its default (None:
    neither)."""
    if key in spec:
        return spec[key]
    rule = rule_of(spec)
    if rule is not None:
        return rule.defaults.get(key)
    return class_defaults(optimizer_class(spec["name"], "spec")).get(key)


def class_keywords(cls: OptimizerClass) -> set[str] | None:
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.name != "params"}


def class_defaults(cls: OptimizerClass) -> dict[str, Any]:
    """The class's named keywords and their defaults (None where it has none)."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {
        p.name: None if p.default is inspect.Parameter.empty else p.default
        for p in parameters
        if p.name != "params"
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }


def normalize(spec: Any, where: str) -> dict[str, Any]:
    """Check a spec and return it with every default filled in (built-in rules).

    Raises ValueError with a one-line message naming the bad value and what is allowed.
    """
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(
            f"{where} spec {spec!r} is not a dict with a 'name'; allowed: "
            '{"name": "adam", "lr": 1e-3, ...} with name one of ' + ALLOWED_NAMES
        )
    name, given = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    rule = RULES.get(name) if isinstance(name, str) else None
    if rule is not None:
        reject_unknown(given, set(rule.defaults), name, where)
        hyper = {**rule.defaults, **given}
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
        rule.check(hyper, where)
        return {"name": name, **hyper}

    cls = optimizer_class(name, where)
    if needs_closure(cls):
        raise ValueError(
            f"{where} optimizer {cls.__name__} steps only with a closure that re-evaluates the "
            "loss at weights of its choosing; allowed: an optimizer whose step() takes the "
            "gradient as given (Graft measures M and D on one gradient)"
        )
    allowed = class_keywords(cls)
    if allowed is not None:
        reject_unknown(given, allowed, getattr(cls, "__name__", str(name)), where)
    if "lr" not in given:
        default = inspect.signature(cls.__init__).parameters.get("lr")
        if default is None or default.default is inspect.Parameter.empty:
            raise ValueError(f"{where} spec for {name!r} has no 'lr'; allowed: a float lr >= 0")
        given["lr"] = default.default
    if not isinstance(given["lr"], float | int) or given["lr"] < 0:
        raise ValueError(f"invalid lr={given['lr']!r} for {name!r} in {where}; allowed: lr >= 0")
    return {"name": import_path(cls) if inspect.isclass(name) else name, **given}


def needs_closure(cls: OptimizerClass) -> bool:
    """Whether the class's step requires a closure (torch.optim.LBFGS: `step(self, closure)`)."""
    closure = inspect.signature(cls.step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


def reject_unknown(given: Mapping[str, Any], allowed: set[str], name: str, where: str) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(
            f"unknown keyword {unknown[0]!r} for '{name}' in {where}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


# The keys torch's momentum-cycling schedulers (OneCycleLR, CyclicLR) write, in the order
# they look for them: "betas" (β1 is its first entry) or "momentum".
MOMENTUM_KEYS = ("betas", "momentum")

# Param-group keys Graft itself reads; any other key goes to the optimizers that name it
# as a keyword, else stays in the group as is (a tag such as "name", a scheduler's own).
GROUP_KEYS = (
    "params",
    "param_names",
    "lr",
    "magnitude",
    "direction",
    "eps",
    "granularity",
    "maximize",
    "inner_groups",  # the black-box path's inner optimizers' groups (black_box.INNER_GROUPS)
)

# The pair's weight decay, which a group holds where M and D run one value.
WEIGHT_DECAY = "weight_decay"


def group_tags(group: Mapping[str, Any]) -> dict[str, Any]:
    """A Graft param group's keys that are neither Graft's own (GROUP_KEYS, M's momentum,
    the pair's weight decay) nor in a spec: tags such as "name", a scheduler's
    "initial_lr", flags an optimizer reads from its groups (pytorch-optimizer's Muon's
    "use_muon")."""
    own = {*GROUP_KEYS, *MOMENTUM_KEYS, WEIGHT_DECAY}
    return {key: value for key, value in group.items() if key not in own}


def momentum_key(spec: Mapping[str, Any]) -> str | None:
    """Which of MOMENTUM_KEYS the spec's optimizer takes (None: neither)."""
    return next((key for key in MOMENTUM_KEYS if takes_number(spec, key)), None)


def takes_number(spec: Mapping[str, Any], key: str) -> bool:
    """Whether the spec's optimizer takes `key` and runs it at a number (β1, for betas)."""
    if key not in spec and key not in declared_keywords(spec):
        return False
    value = keyword_default(spec, key)
    if key == "betas" and isinstance(value, tuple | list) and value:
        value = value[0]
    return isinstance(value, float | int) and not isinstance(value, bool)
