"""The run's optimizer: a Graft of the configured magnitude and direction.

With `static=PATH` (multipliers from graft-static derive) or `schedule=replay`, the optimizer
is plain M with one param group per tensor, named, so each tensor gets its own learning rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from graft.common.errors import UserError
from graft.optim import Graft
from graft.train.config import CONFIGS
from graft.train.multipliers import load_multipliers

ROLES = ("magnitude", "direction")


def optimizer_specs(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """M's and D's specs: their optim/ files with the `optimizers` table laid over them.

    `optimizers.<name>.<key>` sets an optimizer's hyperparameter wherever it is M or D, which
    is how a grid gives every cell its optimizers' own (tuned) settings: M#D then runs with
    M's learning rate and D's momentum, betas, eps. The table wins over the optim/ files'
    values only: one hyperparameter set both in the table and by a role override
    (`magnitude.lr=...`) is refused before the run (refuse_two_sources).
    """
    table = config.get("optimizers") or {}
    magnitude, direction = config["magnitude"], config["direction"]
    return (
        {**magnitude, **table.get(magnitude["name"], {})},
        {**direction, **table.get(direction["name"], {})},
    )


def refuse_two_sources(
    overrides: Iterable[str],
    table: Mapping[str, Any],
    in_role: Mapping[str, Iterable[str]],
    table_in: str = "on the command line",
) -> None:
    """The one precedence rule between the `optimizers` table and `magnitude.*` /
    `direction.*`: each hyperparameter is set in one of them, never in both.

    UserError (one line naming both) when an override sets `<role>.<key>` (magnitude.lr=0.3)
    while the table sets `<key>` for an optimizer that takes that role in the run (in_role:
    role -> those optimizers; a grid's: every M, every D). Either would leave the
    other unseen; the user picks one. table_in says where the table was written, for the
    message.
    """
    for line in overrides:
        role, _, key = line.partition("=")[0].lstrip("+~").partition(".")
        if role not in ROLES or not key:
            continue
        key = key.split(".")[0]
        for name in in_role.get(role, ()):
            if key in (table.get(name) or {}):
                raise UserError(
                    f"{line} and optimizers.{name}.{key} ({table_in}) both set {name}'s {key} "
                    f"as {role}; set it once: in the table (optimizers.{name}.{key}=VALUE, "
                    f"wherever {name} runs) or as {role}.{key} without a table entry for it"
                )


def check_optimizer(config: Mapping[str, Any]) -> None:
    """Before any data or model is built: UserError for what build_optimizer would refuse
    (a bad spec, static with grafting or with a replay, a missing multipliers file), and
    for settings in the `optimizers` table that its named optimizer does not take."""
    probe = nn.Linear(1, 1)
    for name, settings in (config.get("optimizers") or {}).items():
        spec = OmegaConf.to_container(OmegaConf.load(CONFIGS / "optim" / f"{name}.yaml"))
        where = f"optimizers.{name}"
        graft_or_user_error(probe.parameters(), {**spec, **settings}, None, config, where)
    static = config.get("static")
    if static and not Path(str(static)).is_file():
        raise UserError(
            f"static={static}: no such file (make one with graft-static derive RUN_DIR)"
        )
    build_optimizer(probe, config, multipliers_checked=False)


def graft_or_user_error(params, magnitude, direction, config, where: str = "") -> Graft:
    graft = config["graft"]
    try:
        return Graft(
            params,
            magnitude=magnitude,
            direction=direction,
            granularity=graft["granularity"],
            eps=graft["eps"],
            compile=graft.get("compile", False),
        )
    except (ValueError, TypeError) as error:
        place = where or "magnitude.*, direction.*, optimizers.* or graft.*"
        raise UserError(f"{error} (fix it in {place})") from None


def build_optimizer(
    model: nn.Module, config: Mapping[str, Any], *, multipliers_checked: bool = True
) -> Graft:
    """M#D over the model's trainable parameters (plain M with `graft.enabled` false).

    With `trainer.decay_1d` false, biases and normalisation scales (tensors of ndim <= 1)
    get weight_decay 0 for both M and D. With `static` or a replayed schedule, every tensor
    is its own group (its lr: M's lr x its static multiplier).
    """
    graft = config["graft"]
    magnitude, direction = optimizer_specs(config)
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    per_tensor = bool(config.get("static")) or config["schedule"]["name"] == "replay"
    if config.get("static") and config["schedule"]["name"] == "replay":
        raise UserError(
            f"static={config['static']} with schedule=replay would apply the correction twice "
            "(a replay already holds it); choose one"
        )
    if per_tensor:
        multipliers = (
            load_multipliers(config["static"], [name for name, _ in named])
            if config.get("static") and multipliers_checked
            else {}
        )
        groups: list[dict[str, Any]] = [
            {
                "params": [param],
                "param_names": [name],
                "lr": magnitude["lr"] * multipliers.get(name, 1.0),
                **({} if decays(param, config) else {"weight_decay": 0.0}),
            }
            for name, param in named
        ]
    else:
        params = [param for _, param in named]
        groups = [
            {"params": [p for p in params if decays(p, config)]},
            {"params": [p for p in params if not decays(p, config)], "weight_decay": 0.0},
        ]
    optimizer = graft_or_user_error(
        [group for group in groups if group["params"]],
        magnitude,
        direction if graft["enabled"] else None,
        config,
    )
    if per_tensor and optimizer.grafting():
        what = f"static={config['static']}" if config.get("static") else "schedule=replay"
        raise UserError(
            f"{what} sets per-layer learning rates of a plain optimizer, but this run grafts "
            f"{magnitude['name']}#{direction['name']}; add graft=off"
        )
    return optimizer


def decays(param: Any, config: Mapping[str, Any]) -> bool:
    """Whether weight decay applies: not to biases and norm scales if trainer.decay_1d is false."""
    return config["trainer"]["decay_1d"] or param.ndim > 1
