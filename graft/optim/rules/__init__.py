"""The built-in rules, by spec name: the registry that Graft, the tests and the README's rule
table read."""

from __future__ import annotations

from typing import Any

from graft.optim.rules.adagrad import Adagrad
from graft.optim.rules.adam import Adam, AdamW
from graft.optim.rules.base import Rule, Variant
from graft.optim.rules.lamb import LAMB
from graft.optim.rules.lars import LARS
from graft.optim.rules.rmsprop import RMSprop
from graft.optim.rules.sgd import SGD

RULES: dict[str, type[Rule]] = {
    rule.name: rule for rule in (SGD, Adam, AdamW, Adagrad, RMSprop, LARS, LAMB)
}


def variant_specs(compiled: bool = False) -> dict[str, dict[str, Any]]:
    """Every rule's `Rule.variants` as specs, by a readable id ("sgd-lr=0.1-momentum=0.9").

    compiled: only the variants the compiled step's tests trace.
    """
    found: dict[str, dict[str, Any]] = {}
    for rule in RULES.values():
        for variant in rule.variants:
            if compiled and not variant.compiled:
                continue
            keywords = variant.keywords
            label = "-".join([rule.name, *(f"{key}={value}" for key, value in keywords.items())])
            if label in found:
                raise ValueError(f"variant {label} is listed twice in {rule.__name__}.variants")
            found[label] = {"name": rule.name, **keywords}
    return found


__all__ = ["RULES", "Rule", "Variant", "variant_specs"]
