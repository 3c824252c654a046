"""Learning-rate grafting: M#D takes the step magnitude of M and the direction of D."""

from graft.optim import Graft, StepNorms

__all__ = ["Graft", "StepNorms"]
__version__ = "0.1.0"
