"""Grafted optimizers: the update rules, their combination (eager and compiled paths), and
the black-box path for any torch optimizer."""

from graft.optim.graft import GRANULARITIES, Graft
from graft.optim.rules import RULES
from graft.optim.state_bytes import state_bytes
from graft.optim.update import StepNorms

__all__ = ["GRANULARITIES", "RULES", "Graft", "StepNorms", "state_bytes"]
