"""`graft-train` (= `python -m graft.train`): one M#D cell, configured by Hydra.

Command-line mistakes are caught before Hydra starts a run: an unknown group option (the
options listed) or an override that does not apply is one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import traceback
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from graft.common.errors import RunDirTaken, UserError, exit_with
from graft.common.run_dir import CONFIG, HYDRA
from graft.train.checks import check_before_building
from graft.train.config import CONFIGS, GROUP_FOLDERS, group_options, register_resolvers
from graft.train.loop import train
from graft.train.strict import check_config
from graft.train.summary import write_error_log

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
        check_overrides(overrides, sweep=multirun)
    except UserError as error:
        exit_with("graft-train", error)
    run_hydra()


def check_overrides(overrides: list[str], *, compose_too: bool = True, sweep: bool = False) -> None:
    """UserError for an unknown group option, or an override that does not compose or is
    refused by the checks every run makes before building anything (graft/train/strict.py,
    check_before_building). A sweep (`-m`) is checked on every value it sweeps."""
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
    if not compose_too:
        return
    for job in sample_jobs(parsed) if sweep else [overrides]:
        config, run_dir = compose_run(job)
        check_config(job, config, sweeping=sweep)
        check_before_building(config)
        if not sweep:
            check_run_dir(run_dir)


def sample_jobs(parsed: list[Override]) -> list[list[str]]:
    """Jobs of a sweep that between them hold every swept value once (each value with the
    first of every other sweep): as many jobs as values, not as the sweep's product."""

    def line(override: Override, value: str) -> str:
        prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++"}.get(override.type, "")
        return f"{prefix}{override.get_key_element()}={value}"

    values = [
        list(override.sweep_string_iterator()) if override.is_sweep_override() else None
        for override in parsed
    ]
    first = [
        line(override, choices[0]) if choices else override.input_line
        for override, choices in zip(parsed, values)
    ]
    jobs = [first]
    for index, choices in enumerate(values):
        for value in (choices or [])[1:]:
            jobs.append([*first[:index], line(parsed[index], value), *first[index + 1 :]])
    return jobs


def compose_run(overrides: list[str]) -> tuple[dict, Path]:
    """The resolved config a single run of `overrides` gets, and its run directory."""
    # A launcher and its settings change where runs go, not what they compute.
    overrides = [
        item
        for item in overrides
        if not item.lstrip("+~").startswith(("hydra/launcher", "hydra.launcher"))
    ]
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the run directory
            run_dir = Path(cfg.hydra.run.dir)
            with open_dict(cfg):
                del cfg["hydra"]
            return OmegaConf.to_container(cfg, resolve=True), run_dir
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(f"{first_line(error)} (check the command-line overrides)") from None


def check_run_dir(run_dir: Path) -> None:
    """UserError unless run_dir is (or can be made) a folder this process can write in."""
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise UserError(
                f"the run directory {run_dir} cannot be made: {folder} is a file; move it away "
                "or pick another folder with hydra.run.dir=..."
            )
        if folder.is_dir():
            try:  # a real write: permission bits alone do not say (root, read-only mounts)
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as error:
                raise UserError(
                    f"cannot write in {folder} ({error.strerror}) for the run directory "
                    f"{run_dir}; pick another folder with hydra.run.dir=..."
                ) from None
            return


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@hydra.main(config_path=str(CONFIGS), config_name="train", version_base="1.3")
def run_hydra(cfg: DictConfig) -> None:
    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)

    def record_config() -> None:
        """Hydra's own .hydra/ files, written once, after the run dir proved to be this run's."""
        record = run_dir / HYDRA
        if (run_dir / CONFIG).exists():
            return
        record.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / CONFIG)
        OmegaConf.save(OmegaConf.create({"hydra": hydra_config}), record / "hydra.yaml")
        OmegaConf.save(
            OmegaConf.create(list(hydra_config.overrides.task)), record / "overrides.yaml"
        )

    sweeping = hydra_config.mode == RunMode.MULTIRUN
    try:
        if sweeping:  # a single run was checked before Hydra started
            check_config(list(hydra_config.overrides.task), config, sweeping=True)
        code = train(config, run_dir, record_config)
    except UserError as error:
        if sweeping:  # one bad job: its reason on disk, Hydra records it, the sweep goes on
            if not isinstance(error, RunDirTaken):
                write_error_log(run_dir, str(error))
            raise
        exit_with("graft-train", error)
    except Exception:
        write_error_log(run_dir, "the run crashed (traceback below)", traceback.format_exc())
        raise
    if code and not sweeping:  # a failed job of a sweep is recorded in its summary.json
        sys.exit(code)
