"""The run's optimizer: a Graft of the configured magnitude and direction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from graft.optim import Graft
from graft.train.errors import UserError


def optimizer_specs(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """M's and D's specs: their optim/ files with the `optimizers` table laid over them.

    `optimizers.<name>.<key>` sets an optimizer's hyperparameter wherever it is M or D, which
    is how a grid gives every cell its optimizers' own (tuned) settings: M#D then runs with
    M's learning rate and D's momentum, betas, eps.
    """
    table = config.get("optimizers") or {}
    magnitude, direction = config["magnitude"], config["direction"]
    return (
        {**magnitude, **table.get(magnitude["name"], {})},
        {**direction, **table.get(direction["name"], {})},
    )


def build_optimizer(model: nn.Module, config: Mapping[str, Any]) -> Graft:
    """M#D over the model's trainable parameters (plain M with `graft.enabled` false).

    With `trainer.decay_1d` false, biases and normalisation scales (tensors of ndim <= 1)
    form a second param group with weight_decay 0 for both M and D.
    """
    graft = config["graft"]
    magnitude, direction = optimizer_specs(config)
    params = [param for param in model.parameters() if param.requires_grad]
    if config["trainer"]["decay_1d"]:
        groups: list[dict[str, Any]] = [{"params": params}]
    else:
        groups = [
            {"params": [param for param in params if param.ndim > 1]},
            {"params": [param for param in params if param.ndim <= 1], "weight_decay": 0.0},
        ]
    try:
        return Graft(
            [group for group in groups if group["params"]],
            magnitude=magnitude,
            direction=direction if graft["enabled"] else None,
            granularity=graft["granularity"],
            eps=graft["eps"],
        )
    except ValueError as error:
        raise UserError(
            f"{error} (fix it in the magnitude, direction, optimizers or graft config, "
            "e.g. magnitude.lr=...)"
        ) from None
