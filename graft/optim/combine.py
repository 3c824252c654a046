"""What every grafted step shares: the ratio that gives D's direction M's magnitude, and
the optimizer the steps read.

The eager step (graft.py), the compiled one (compiled.py, with the native loops' norms)
and the black-box one (black_box.py) all scale u_D by `grafting_ratio`, per tensor or over
all tensors; none writes the formula itself.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from torch import Tensor

Norm = TypeVar("Norm", Tensor, float)


def grafting_ratio(magnitude: Norm, direction: Norm, eps: Any) -> Norm:
    """‖u_M‖ / (‖u_D‖ + eps): the factor that turns u_D into the grafted step.

    magnitude, direction: ‖u_M‖ and ‖u_D‖, tensors of one shape (one entry per tensor, or
        0-d for global grafting) or floats; eps: a float or a tensor that broadcasts.
    Elementwise, in the norms' precision; u_D = 0 gives 0 (eps > 0), whatever ‖u_M‖.
    """
    return magnitude / (direction + eps)


class GraftLike(Protocol):
    """The optimizer as the compiled and black-box steps read it (graft.Graft is one): its
    param groups (M's lr, both specs, eps), its per-tensor state (under "magnitude" and
    "direction"), its granularity, whether a direction is grafted on, the black-box path's
    precision, and its eager step (which the whole-step graph traces)."""

    param_groups: list[dict[str, Any]]
    state: Any  # per tensor: {"magnitude": {...}, "direction": {...}}
    black_box_fp64: bool  # the black-box path steps fp64 copies (else the weights' dtype)

    @property
    def granularity(self) -> str: ...

    def grafting(self) -> bool: ...

    def _eager_step(self) -> Any: ...  # graft.optim.update.StepNorms
