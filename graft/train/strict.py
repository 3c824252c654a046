"""What a composed config may hold: keys that configure something, values of their defaults' kinds.

Hydra refuses `trainer.max_step=5` (no such key), but a key added with `+` (or `++`) is taken
as given and, with nothing reading it, silently configures nothing. So the run's config is
compared with its *base*: the same config groups (task, optimizers, schedule, ...) composed
without any value override. A key the base lacks was added by hand, and is refused unless it
sits where additions are expected (`optimizers.<name>.<key>`, checked against that optimizer).
A value whose default is a number, a flag, a string, a list or a mapping must be one too.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from graft.common.errors import UserError
from graft.train.config import CONFIGS, GROUP_FOLDERS, group_options, register_resolvers
from graft.train.optimizer import refuse_two_sources

# Where a config grows keys of its own by design: the per-optimizer table.
OPTIMIZER_TABLE = "optimizers"


def logger_keys() -> set[str]:
    """Keys any logger of configs/logger/ takes: each is accepted whichever logger runs, so
    one set of overrides (a grid's ++logger.group) serves logger=wandb and logger=none."""
    return {
        key
        for path in (CONFIGS / "logger").glob("*.yaml")
        for key in OmegaConf.to_container(OmegaConf.load(path))
    }


def base_config(overrides: list[str]) -> dict[str, Any]:
    """train.yaml composed with the overrides' group choices only (no value overrides)."""
    register_resolvers()
    choices = [item for item in overrides if override_key(item) in GROUP_FOLDERS]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra job: its config tree is ours
        return OmegaConf.to_container(compose("train", overrides=choices), resolve=False)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=choices), resolve=False)


def override_key(item: str) -> str:
    return item.partition("=")[0].lstrip("+~")


def check_config(overrides: list[str], config: Mapping[str, Any], *, sweeping: bool) -> None:
    """UserError (one line) for a key that configures nothing or a value of the wrong kind.

    overrides: the command line's (Hydra syntax); config: the resolved composition of them.
    sweeping: the run is one job of a multirun, whose `optimizers` table serves every job.
    """
    user = [item for item in overrides if not override_key(item).startswith("hydra")]
    base = base_config(user)
    written = {override_key(item): item for item in user}
    for key, value in walk(config):
        top = key.split(".")[0]
        if top == OPTIMIZER_TABLE:
            continue
        default, found = lookup(base, key)
        if not found:
            if top == "logger" and key.split(".")[-1] in logger_keys():
                continue
            raise UserError(unknown_key_message(key, value, base, written))
        check_kind(key, value, default, written)
    check_optimizer_table(config, sweeping=sweeping)
    in_run = {"magnitude": [config["magnitude"]["name"]], "direction": []}
    if config["graft"]["enabled"]:
        in_run["direction"] = [config["direction"]["name"]]
    refuse_two_sources(user, config.get(OPTIMIZER_TABLE) or {}, in_run)


def walk(config: Mapping[str, Any], prefix: str = ""):
    """(dotted key, value) for every leaf; an empty mapping is a leaf."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from walk(value, name + ".")
        else:
            yield name, value


def lookup(tree: Mapping[str, Any], key: str) -> tuple[Any, bool]:
    """(value, True) when the dotted key exists in tree (its value may be null)."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None, False
        node = node[part]
    return node, True


def unknown_key_message(key: str, value: Any, base: Mapping[str, Any], written: dict) -> str:
    """'+trainer.max_step=5 configures nothing: trainer has no key max_step (did you mean...)'."""
    parent, _, name = key.rpartition(".")
    while parent and not lookup(base, parent)[1]:  # a whole new branch: name its first part
        parent, _, name = parent.rpartition(".")
    siblings = lookup(base, parent)[0] if parent else base
    keys = sorted(siblings) if isinstance(siblings, Mapping) else []
    shown = written.get(key) or next(
        (item for k, item in written.items() if key.startswith(k + ".") or k.startswith(key)),
        f"{key}={value!r}",
    )
    near = difflib.get_close_matches(name, keys, n=1)
    where = f"{parent} has no key {name!r}" if parent else f"the config has no key {name!r}"
    if near:
        hint = f"did you mean {parent + '.' if parent else ''}{near[0]}?"
    else:
        hint = f"its keys: {', '.join(keys)}" if keys else "it takes no keys"
    return f"{shown} configures nothing: {where}; {hint} (fix the override)"


def kind(value: Any) -> str | None:
    """The kind of a config value, as a user would name it; None for null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    return "a mapping"


def check_kind(key: str, value: Any, default: Any, written: dict) -> None:
    """UserError when value is not of its default's kind (null is always allowed: it means
    "not set", and what reads the key says whether that is allowed). A default float takes
    an integer, a default integer does not take a fraction."""
    expected, given = kind(default), kind(value)
    if expected is None or given is None or (isinstance(default, str) and "${" in default):
        return  # null, or an interpolation (whose kind is its target's)
    wrong = given != expected or (
        expected == "a number"
        and isinstance(default, int)
        and not isinstance(default, bool)
        and not isinstance(value, int)
    )
    if expected == "a list" and not wrong and default and value:
        inner = {kind(item) for item in default}
        if len(inner) == 1 and any(kind(item) not in inner | {None} for item in value):
            wrong = True
            expected = f"a list of {inner.pop().removeprefix('a ')}s"
    if wrong:
        if expected == "a number" and isinstance(default, int):
            expected = "an integer"
            given = "a fraction" if given == "a number" else given
        shown = written.get(key, f"{key}={value!r}")
        raise UserError(
            f"{shown} is {given}, but {key} takes {expected} (its default: "
            f"{format_default(default)}); fix the override"
        )


def format_default(value: Any) -> str:
    """A default as one would type it in an override: [0.9, 0.999], true, 0.001."""
    return json.dumps(value) if not isinstance(value, str) else value


def check_optimizer_table(config: Mapping[str, Any], *, sweeping: bool) -> None:
    """`optimizers.<name>` must name an optimizer of configs/optim/, with settings in a
    mapping; in a single run, one that is the run's M or D (else it configures nothing).
    The settings themselves are checked with that optimizer's own (Graft's) validation."""
    table = config.get(OPTIMIZER_TABLE) or {}
    if not isinstance(table, Mapping):
        raise UserError(
            f"optimizers={table!r} is not a mapping; use +optimizers.<name>.<key>=value"
        )
    known = group_options("optim@magnitude")
    in_run = {config["magnitude"]["name"]}
    if config["graft"]["enabled"]:
        in_run.add(config["direction"]["name"])
    for name, settings in table.items():
        if name not in known:
            near = difflib.get_close_matches(str(name), known, n=1)
            raise UserError(
                f"optimizers.{name} names no optimizer"
                + (f" (did you mean {near[0]}?)" if near else "")
                + f"; allowed: {', '.join(known)} (configs/optim/)"
            )
        if not isinstance(settings, Mapping):
            raise UserError(
                f"optimizers.{name}={settings!r} is not a mapping of settings; use "
                f"+optimizers.{name}.<key>=value"
            )
        if name not in in_run and not sweeping:
            raise UserError(
                f"optimizers.{name}.* configures nothing: this run's optimizers are "
                f"{' and '.join(sorted(in_run))} (set magnitude.<key> or direction.<key>, or "
                "pick the optimizer with optim@magnitude=... / optim@direction=...)"
            )
