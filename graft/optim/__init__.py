"""Grafted optimizers: the update rules, their combination, and the black-box reference."""

from graft.optim.graft import GRANULARITIES, Graft, StepNorms
from graft.optim.rules import RULES

__all__ = ["GRANULARITIES", "RULES", "Graft", "StepNorms"]
