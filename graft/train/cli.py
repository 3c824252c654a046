"""`graft-train` (= `python -m graft.train`): one M#D cell, configured by Hydra.

Command-line mistakes are caught before Hydra starts a run: an unknown group option (the
options listed) or an override that does not apply is one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from graft.train.config import CONFIGS, GROUP_FOLDERS, group_options, register_resolvers
from graft.train.errors import UserError, exit_with
from graft.train.loop import train

log = logging.getLogger(__name__)

register_resolvers()


# Keys whose values are paths: quoted for Hydra, since run directories hold '#' and ','.
PATH_KEYS = ("static", "schedule.run")


def quote_paths(args: list[str]) -> list[str]:
    """static=outputs/x/adam#sgd/... -> static='outputs/x/adam#sgd/...' (unless quoted or
    null). A quoted value is one path: such keys are not swept with commas."""
    quoted = []
    for arg in args:
        key, _, value = arg.partition("=")
        if (
            key.lstrip("+") in PATH_KEYS
            and value not in ("", "null", "???")
            and value[0] not in "'\""
        ):
            arg = f"{key}='{value}'"
        quoted.append(arg)
    return quoted


def main() -> None:
    sys.argv[1:] = quote_paths(sys.argv[1:])
    overrides = [arg for arg in sys.argv[1:] if not arg.startswith("-") and "=" in arg]
    multirun = any(arg in ("-m", "--multirun") for arg in sys.argv[1:])
    try:
        check_overrides(overrides, compose_too=not multirun)
    except UserError as error:
        exit_with("graft-train", error)
    run_hydra()


def check_overrides(overrides: list[str], *, compose_too: bool = True) -> None:
    """UserError for an unknown group option or an override that does not compose."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise UserError(f"bad override: {first_line(error)}") from None
    for override in parsed:
        group = override.get_key_element().lstrip("+~")
        if group not in GROUP_FOLDERS or override.is_delete():
            continue
        choices = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.get_value_element_as_str()]
        )
        allowed = group_options(group)
        for choice in choices:
            if choice not in allowed:
                raise UserError(
                    f"unknown {group} option {choice!r} in {override.input_line}; allowed: "
                    f"{', '.join(allowed)} (configs/{GROUP_FOLDERS[group]}/)"
                )
    if compose_too:
        task_overrides = [item for item in overrides if not item.lstrip("+~").startswith("hydra")]
        try:
            with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
                OmegaConf.to_container(compose("train", overrides=task_overrides), resolve=True)
        except (HydraException, OmegaConfBaseException) as error:
            raise UserError(f"{first_line(error)} (check the command-line overrides)") from None


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@hydra.main(config_path=str(CONFIGS), config_name="train", version_base="1.3")
def run_hydra(cfg: DictConfig) -> None:
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)

    def record_config() -> None:
        """Hydra's own .hydra/ files, written once, after the run dir proved to be this run's."""
        record = run_dir / ".hydra"
        if (record / "config.yaml").exists():
            return
        record.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, record / "config.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": hydra_config}), record / "hydra.yaml")
        OmegaConf.save(
            OmegaConf.create(list(hydra_config.overrides.task)), record / "overrides.yaml"
        )

    sweeping = hydra_config.mode == RunMode.MULTIRUN
    try:
        code = train(config, run_dir, record_config)
    except UserError as error:
        if sweeping:  # one bad job: Hydra records it and the sweep goes on
            raise
        exit_with("graft-train", error)
    if code and not sweeping:  # a failed job of a sweep is recorded in its summary.json
        sys.exit(code)
