"""The built-in rules, by spec name."""

from graft.optim.rules.adagrad import Adagrad
from graft.optim.rules.adam import Adam, AdamW
from graft.optim.rules.base import Rule
from graft.optim.rules.lamb import LAMB
from graft.optim.rules.lars import LARS
from graft.optim.rules.rmsprop import RMSprop
from graft.optim.rules.sgd import SGD

RULES: dict[str, type[Rule]] = {
    rule.name: rule for rule in (SGD, Adam, AdamW, Adagrad, RMSprop, LARS, LAMB)
}

__all__ = ["RULES", "Rule"]
