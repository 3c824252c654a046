"""Experiment files: an M#D grid, its seeds and settings, and the paper's numbers beside it.

An experiment (`experiments/<name>.yaml`) holds:

    name, description
    extends:     optional: a base file (path relative to this file's folder, e.g.
                 base/digits.yaml) whose keys this file extends; see `extended`
    task:        a configs/task/ option
    grid:        {magnitude: [optimizers], direction: [optimizers]}
    seeds:       [0, 1, 2]
    optimizers:  {name: {hyperparameter: value}}: each optimizer's own settings, used wherever
                 it is M or D (M#D takes M's learning rate; the diagonal is plain M). A
                 role override on the command line (magnitude.lr=...) may not set the same
                 hyperparameter of an optimizer the table sets (graft/train/optimizer.py)
    tuned_from:  optional: a tuned results folder (results/<experiment>-tuned, relative to the
                 repository root); `lr: tuned` in optimizers takes the learning rate its
                 tuning.md chose (graft/grid/tuning_record.py), so the value lives there alone
    overrides:   Hydra overrides for every cell (trainer.max_steps=..., schedule=...)
    metrics:     summary keys that fill the table (eval/top1, ...); the first is the headline
    reference:   {"M#D": {metric: value}}: the paper's numbers where known
    tune:        optional learning-rate sweeps of the diagonal (graft-grid --tune; tune.py)
    verdict:     optional: how graft-table judges each M#D against M#M and D#D
                 (graft/grid/verdict.py): {curve: train/loss, resamples: 10000}, the defaults
    study:       optional: instead of the grid's table, a study of its one M#D pair
                 (graft/grid/studies.py): {kind: static, window, reduce},
                 {kind: tuning_transfer, lrs: [D's learning rates]} or {kind: schedule_trend}

Every key is checked when the file loads, in one place (SCHEMA: each key's shape; then `check`:
what the names refer to), so a mistake is one line naming the file, the key and the value,
before anything runs. A base is checked alone first (BASE_SCHEMA), so a mistake in it names it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from graft.common.errors import UserError
from graft.common.run_dir import cell_name
from graft.common.validation import Allowed, at_least
from graft.grid.tuning_record import RECORD, TUNED, chosen_lrs
from graft.train.config import CONFIGS, group_options
from graft.train.strict import override_key
from graft.transfer.static import REDUCTIONS

REPOSITORY = Path(__file__).resolve().parents[2]  # where results/ is: tuned_from's root
EXPERIMENTS = REPOSITORY / "experiments"
BASES = EXPERIMENTS / "base"  # what experiments extend; not experiments themselves
TUNED_SUFFIX = "-tuned"  # results/<name>-tuned/: a tuned grid's (graft/grid/publish.py)

# Study kinds and the options each takes (graft/grid/studies.py).
STUDY_OPTIONS = {
    "static": ("window", "reduce", "scales"),
    "tuning_transfer": ("lrs",),
    "schedule_trend": (),
}


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    task: str
    magnitudes: list[str]
    directions: list[str]
    seeds: list[int]
    metrics: list[str]
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    tune: dict[str, Any] = field(default_factory=dict)  # see graft/grid/tune.py
    study: dict[str, Any] = field(default_factory=dict)  # see graft/grid/studies.py
    verdict: dict[str, Any] = field(default_factory=dict)  # see graft/grid/verdict.py
    source: Path | None = None
    tuned_from: str | None = None  # the record its `lr: tuned` values came from, as written
    # The file as it runs: its base merged in, `lr: tuned` filled in (what another version of
    # the experiment is told apart by, graft/grid/run.py).
    document: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[tuple[str, str]]:
        """(M, D) for every cell, rows M, columns D."""
        return [(m, d) for m in self.magnitudes for d in self.directions]

    def cell_names(self) -> list[str]:
        return [cell_name(m, d, True) for m, d in self.cells()]

    def shared_overrides(self, extra: list[str]) -> list[str]:
        """The overrides every run shares (a grid adds M, D and the seed); extra: the command
        line's."""
        return [f"task={self.task}", *self.optimizer_overrides(), *self.overrides, *extra]

    def optimizer_overrides(self) -> list[str]:
        """`+optimizers.<name>.<key>=<value>` for the trainer, one per setting."""
        return [
            f"+optimizers.{name}.{key}={format_value(value)}"
            for name, settings in sorted(self.optimizers.items())
            for key, value in sorted(settings.items())
        ]


def format_value(value: Any) -> str:
    """A Hydra override value: lists as [a,b], everything else as YAML writes it."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(item) for item in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def available() -> list[str]:
    return sorted(path.stem for path in EXPERIMENTS.glob("*.yaml"))


# --- the shape of each key --------------------------------------------------------------------


class Bad(Exception):
    """A value of the wrong shape: its key (dotted) and what is wrong, naming the value."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}: {shown(value)} is not {allowed}")


class Misplaced(Bad):
    """A key that is missing, or one that configures nothing."""

    def __init__(self, key: str, problem: str) -> None:
        Exception.__init__(self, f"{key}: {problem}")


Check = Callable[[Any, str], None]  # raises Bad for (value, key)


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def kind(allowed: Allowed) -> Check:
    """The check of one value against its allowed values (graft/common/validation.py)."""

    def check(value: Any, key: str) -> None:
        if not allowed.accepts(value):
            raise Bad(key, value, allowed.text)

    return check


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


TEXT = kind(Allowed(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"))
ANY_TEXT = kind(Allowed(lambda v: isinstance(v, str), "a string"))
SEED = kind(at_least(0, integer=True))
NUMBER = kind(Allowed(is_number, "a finite number"))
POSITIVE = kind(Allowed(lambda v: is_number(v) and v > 0, "a number > 0"))
SCALAR = kind(
    Allowed(
        lambda v: v is None or isinstance(v, str | bool) or is_number(v), "a number, string or bool"
    )
)
NAME = kind(
    Allowed(
        lambda v: (
            isinstance(v, str)
            and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v) is not None
            and not v.endswith(TUNED_SUFFIX)
        ),
        f"a folder name (letters, digits, _ . -) not ending in {TUNED_SUFFIX!r}",
    )
)


def setting(value: Any, key: str) -> None:
    """An optimizer hyperparameter: a scalar, or a list of scalars (betas: [0.9, 0.999])."""
    for item in value if isinstance(value, list) else [value]:
        SCALAR(item, key)


def list_of(item: Check, example: str, *, empty: bool = False) -> Check:
    """A YAML list of distinct items, each passing `item`; non-empty unless `empty`."""

    def check(value: Any, key: str) -> None:
        if not isinstance(value, list) or (not value and not empty):
            raise Bad(key, value, f"a{'' if empty else ' non-empty'} list, e.g. {example}")
        for index, element in enumerate(value):
            item(element, f"{key}[{index}]")
        repeated = [element for index, element in enumerate(value) if element in value[:index]]
        if repeated:
            raise Bad(key, value, f"a list without repeats ({shown(repeated[0])} is twice)")

    return check


def mapping_of(entry: Check, example: str) -> Check:
    """A YAML mapping with string keys, each value passing `entry`."""

    def check(value: Any, key: str) -> None:
        if not isinstance(value, Mapping):
            raise Bad(key, value, f"a mapping, e.g. {example}")
        for name, element in value.items():
            if not isinstance(name, str):
                raise Bad(f"{key}.{name}", name, "a string key")
            entry(element, f"{key}.{name}")

    return check


def fields(schema: Mapping[str, Check], required: tuple[str, ...] = ()) -> Check:
    """A YAML mapping of exactly these keys (a null value counts as absent where optional)."""

    def check(value: Any, key: str) -> None:
        where = f"{key}." if key else ""
        if not isinstance(value, Mapping):
            raise Bad(key or "the file", value, f"a mapping of {', '.join(schema)}")
        for name, element in value.items():  # a misspelt key first: it explains a missing one
            if name not in schema:
                raise Misplaced(
                    f"{where}{name}",
                    f"unknown key (value {shown(element)}); allowed: {', '.join(schema)}",
                )
        for name in required:
            if value.get(name) is None:
                raise Misplaced(f"{where}{name}", f"missing; e.g. {EXAMPLES[name]}")
        for name, element in value.items():
            if element is not None or name in required:
                schema[name](element, f"{where}{name}")

    return check


def optional_window(value: Any, key: str) -> None:
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"\d*:\d*", value)):
        raise Bad(
            key,
            value,
            "'START:END' in steps, quoted (YAML reads 10:20 unquoted as a number), or null for "
            "the default",
        )


def override(value: Any, key: str) -> None:
    """A Hydra override: parsed here so a typo names the file, not just the command."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    TEXT(value, key)
    try:
        OverridesParser.create().parse_overrides([value])
    except HydraException:
        raise Bad(key, value, "a Hydra override key=value, e.g. trainer.max_steps=100") from None


def tuning_values(value: Any, key: str) -> None:
    """A tune.lr list: two or more distinct positive values (graft/grid/tune.py extends a
    choice at an end of the list by the ratio of the two values there)."""
    list_of(POSITIVE, "[0.01, 0.1]")(value, key)
    if len(value) < 2:
        raise Bad(
            key,
            value,
            "a list of at least two learning rates, e.g. [0.03, 0.1, 0.3] (a choice at an end "
            "is extended by the ratio of the two values there)",
        )


OPTIMIZERS = list_of(TEXT, "[sgd, adam]")
EXAMPLES = {
    "name": "name: my_grid",
    "task": "task: digits_resnet",
    "grid": "grid: {magnitude: [sgd, adam], direction: [sgd, adam]}",
    "magnitude": "magnitude: [sgd, adam]",
    "direction": "direction: [sgd, adam]",
    "seeds": "seeds: [0, 1, 2]",
    "metrics": "metrics: [eval/top1]",
    "lr": "lr: {sgd: [0.01, 0.1]}",
    "kind": f"kind: one of {', '.join(STUDY_OPTIONS)}",
}
KEYS: dict[str, Check] = {
    "name": NAME,
    "description": ANY_TEXT,
    "extends": TEXT,
    "task": TEXT,
    "grid": fields({"magnitude": OPTIMIZERS, "direction": OPTIMIZERS}, ("magnitude", "direction")),
    "seeds": list_of(SEED, "[0, 1, 2]"),
    "optimizers": mapping_of(mapping_of(setting, "{lr: 0.1, momentum: 0.9}"), "{sgd: {lr: 0.1}}"),
    "overrides": list_of(override, "[trainer.max_steps=100]", empty=True),
    "metrics": list_of(TEXT, "[eval/top1, eval/loss]"),
    "reference": mapping_of(mapping_of(NUMBER, "{eval/top1: 0.76}"), '{"adam#sgd": {...}}'),
    "tune": fields(
        {
            "lr": mapping_of(tuning_values, "{sgd: [0.01, 0.1]}"),
            "seeds": list_of(SEED, "[0]"),
            "metric": TEXT,
            "extend": kind(at_least(0, integer=True)),
            "overrides": list_of(override, "[trainer.max_steps=100]", empty=True),
        },
        ("lr",),
    ),
    "study": fields(
        {
            "kind": TEXT,
            "window": optional_window,
            "reduce": TEXT,
            "lrs": list_of(POSITIVE, "[0.01, 0.1]"),
            "scales": list_of(POSITIVE, "[1, 0.6]"),
        },
        ("kind",),
    ),
    "tuned_from": TEXT,
    # Read by graft-table alone (graft/grid/verdict.py has the defaults).
    "verdict": fields({"curve": TEXT, "resamples": kind(at_least(100, integer=True))}),
}
SCHEMA = fields(KEYS, ("name", "task", "grid", "seeds", "metrics"))
# A base holds what experiments share; the name (the results folder) is each one's own, and a
# base extends nothing (one level: a reader finds every value in two files at most).
BASE_SCHEMA = fields({key: check for key, check in KEYS.items() if key not in ("name", "extends")})


# --- loading ----------------------------------------------------------------------------------


def load_experiment(name_or_path: str) -> Experiment:
    """The experiment by name (experiments/<name>.yaml) or by path, checked.

    Raises UserError (one line naming the file, the key and the value) for an unknown
    experiment, a file that is not YAML, a missing or unknown key, a value of the wrong shape,
    an optimizer, task, cell or metric that does not exist, a missing base, or a tuning record
    that is missing or chose no learning rate for an optimizer that takes it.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = EXPERIMENTS / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(
            f"unknown experiment {name_or_path!r}; available: {', '.join(available())} "
            "(or a path to an experiment YAML)"
        )
    if path.resolve().parent == BASES:
        raise UserError(
            f"{path} is a base that experiments extend (extends: base/{path.name}), not an "
            f"experiment; available: {', '.join(available())}"
        )
    raw = read(path)
    if raw is None or raw == {}:
        raise UserError(
            f"{path}: the file is empty; an experiment needs name, task, grid, seeds and "
            "metrics (e.g. experiments/digits_resnet.yaml)"
        )
    if isinstance(raw, Mapping) and raw.get("extends") is not None:
        raw = extended(raw, path)
    try:
        SCHEMA(raw, "")
    except Bad as bad:
        raise UserError(f"{path}: {bad}") from None
    tuned_from = raw.get("tuned_from")
    raw = with_tuned_lrs(raw, path)
    grid = raw["grid"]
    experiment = Experiment(
        name=raw["name"],
        description=raw.get("description") or "",
        task=raw["task"],
        magnitudes=list(grid["magnitude"]),
        directions=list(grid["direction"]),
        seeds=list(raw["seeds"]),
        metrics=list(raw["metrics"]),
        optimizers={name: dict(s or {}) for name, s in (raw.get("optimizers") or {}).items()},
        overrides=list(raw.get("overrides") or []),
        reference=dict(raw.get("reference") or {}),
        tune=dict(raw.get("tune") or {}),
        study=dict(raw.get("study") or {}),
        verdict=dict(raw.get("verdict") or {}),
        source=path,
        tuned_from=tuned_from,
        document=raw,
    )
    check(experiment, path)
    return experiment


def extended(raw: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The experiment file laid over its base (`extends:`, relative to the file's folder).

    Each key the file gives replaces the base's, except `overrides`: the base's lines come
    first, each replaced in place by the file's line for the same key, and the file's other
    lines follow. So `overrides: [trainer.log_norms_every=5]` over a base that logs every 10
    steps changes that one line and keeps the rest.
    """
    if not isinstance(raw["extends"], str) or not raw["extends"].strip():
        raise UserError(
            f"{path}: extends: {shown(raw['extends'])} is not a path to a base file (e.g. "
            "extends: base/digits.yaml)"
        )
    base_path = path.parent / raw["extends"]
    if not base_path.is_file():
        raise UserError(
            f"{path}: extends: {raw['extends']!r}: no such file {base_path} (a path relative "
            f"to {path.parent}, e.g. base/digits.yaml)"
        )
    base = read(base_path) or {}
    try:
        BASE_SCHEMA(base, "")
    except Bad as bad:
        raise UserError(f"{base_path}: {bad}") from None
    merged = {**base, **{key: value for key, value in raw.items() if key != "extends"}}
    if isinstance(raw.get("overrides"), list) and base.get("overrides"):
        merged["overrides"] = merged_overrides(base["overrides"], raw["overrides"])
    return merged


def merged_overrides(base: list[str], own: list[Any]) -> list[Any]:
    """The base's override lines, each replaced by `own`'s line for the same key; then the
    rest of `own`, in order."""
    replacing = {override_key(item): item for item in own if isinstance(item, str)}
    in_base = {override_key(item) for item in base}
    kept = [replacing.get(override_key(item), item) for item in base]
    return [*kept, *(i for i in own if not (isinstance(i, str) and override_key(i) in in_base))]


def with_tuned_lrs(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The file with each `lr: tuned` replaced by the learning rate its `tuned_from` record
    chose; UserError for `tuned` without a record (or in place of another setting), a record
    that is missing, lacks that optimizer, or that no optimizer takes a value from."""
    optimizers = raw.get("optimizers") or {}
    takers = [name for name, settings in optimizers.items() if (settings or {}).get("lr") == TUNED]
    for name, settings in optimizers.items():
        for key, value in (settings or {}).items():
            if value == TUNED and key != "lr":
                raise UserError(
                    f"{path}: optimizers.{name}.{key}: {TUNED!r} stands for a tuned learning "
                    f"rate; {key} takes a value (the tuning record holds learning rates only)"
                )
    source = raw.get("tuned_from")
    if source is None:
        if takers:
            raise UserError(
                f"{path}: optimizers.{takers[0]}.lr: {TUNED!r} needs tuned_from: the tuned "
                "results folder whose tuning.md chose it (e.g. tuned_from: "
                "results/digits_resnet8-tuned)"
            )
        return raw
    if not takers:
        raise UserError(
            f"{path}: tuned_from: {source!r} gives learning rates to no optimizer; write "
            f"lr: {TUNED} where one takes its tuned value, or remove tuned_from"
        )
    record = Path(source) if Path(source).is_absolute() else REPOSITORY / source
    if not (record / RECORD).is_file():
        raise UserError(
            f"{path}: tuned_from: {source!r} holds no {RECORD} ({record / RECORD}); make it "
            "with graft-grid EXPERIMENT --tune, or give the learning rates in optimizers"
        )
    try:
        chosen = chosen_lrs((record / RECORD).read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: tuned_from: {record / RECORD} cannot be read ({error})") from None
    settings = {name: dict(values or {}) for name, values in optimizers.items()}
    for name in takers:
        if name not in chosen:
            raise UserError(
                f"{path}: optimizers.{name}.lr: {TUNED}, but {record / RECORD} chose no "
                f"learning rate for {name} (it chose: {', '.join(sorted(chosen)) or 'none'}); "
                "give its lr here, or tune it in that experiment"
            )
        settings[name]["lr"] = chosen[name]
    resolved = {key: value for key, value in raw.items() if key != "tuned_from"}
    return {**resolved, "optimizers": settings}


def read(path: Path) -> Any:
    """The file's YAML as plain Python; UserError (one line, with the line number) if it is not
    readable YAML."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{path}: not valid YAML{where}: {problem}") from None
    except OmegaConfBaseException as error:
        raise UserError(f"{path}: {str(error).strip().splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot be read ({error})") from None


# --- what the names refer to -------------------------------------------------------------------


def check(experiment: Experiment, path: Path) -> None:
    """The names exist: task, optimizers and their settings, reference cells and metrics,
    tuned optimizers, the study's kind and options."""
    optimizers, tasks = group_options("optim@magnitude"), group_options("task")
    if experiment.task not in tasks:
        raise UserError(
            f"{path}: task: {experiment.task!r} is unknown; allowed: {', '.join(tasks)} "
            "(configs/task/)"
        )
    in_grid = [*experiment.magnitudes, *experiment.directions]
    for key, names in (
        ("grid.magnitude", experiment.magnitudes),
        ("grid.direction", experiment.directions),
        ("optimizers", experiment.optimizers),
    ):
        for name in names:
            if name not in optimizers:
                raise UserError(
                    f"{path}: {key}: unknown optimizer {name!r}; allowed: "
                    f"{', '.join(optimizers)} (configs/optim/)"
                )
    for name, settings in experiment.optimizers.items():
        if name not in in_grid:
            raise UserError(
                f"{path}: optimizers.{name}: {name!r} is not in the grid "
                f"({', '.join(dict.fromkeys(in_grid))}); its settings would apply to nothing"
            )
        known = [key for key in OmegaConf.load(CONFIGS / "optim" / f"{name}.yaml") if key != "name"]
        for key in settings:
            if key not in known:
                raise UserError(
                    f"{path}: optimizers.{name}.{key}: {name} has no setting {key!r}; allowed: "
                    f"{', '.join(known)} (configs/optim/{name}.yaml)"
                )
    cells = experiment.cell_names()
    for cell, values in experiment.reference.items():
        if cell not in cells:
            raise UserError(
                f"{path}: reference.{cell}: {cell!r} is not a cell of the grid; cells: "
                f"{', '.join(cells)}"
            )
        for metric in values:
            if metric not in experiment.metrics:
                raise UserError(
                    f"{path}: reference.{cell}.{metric}: {metric!r} is not in metrics "
                    f"({', '.join(experiment.metrics)}); it would be shown nowhere"
                )
    for name in experiment.tune.get("lr", {}):
        if name not in in_grid:
            raise UserError(
                f"{path}: tune.lr.{name}: {name!r} is not in the grid "
                f"({', '.join(dict.fromkeys(in_grid))})"
            )
    if experiment.study:
        check_study(experiment, path)


def check_study(experiment: Experiment, path: Path) -> None:
    kind = experiment.study["kind"]
    if kind not in STUDY_OPTIONS:
        raise UserError(
            f"{path}: study.kind: {kind!r} is unknown; allowed: {', '.join(STUDY_OPTIONS)}"
        )
    unknown = sorted(set(experiment.study) - {"kind", *STUDY_OPTIONS[kind]})
    if unknown:
        allowed = ", ".join(STUDY_OPTIONS[kind]) or "none"
        raise UserError(
            f"{path}: study.{unknown[0]}: option {unknown[0]!r} does not apply to {kind}; "
            f"allowed: {allowed}"
        )
    if len(experiment.magnitudes) != 1 or len(experiment.directions) != 1:
        raise UserError(
            f"{path}: grid: a {kind} study is of one pair: grid needs one magnitude and one "
            f"direction, not {experiment.magnitudes} x {experiment.directions}"
        )
    reduce = experiment.study.get("reduce", "median")
    if reduce not in REDUCTIONS:
        raise UserError(
            f"{path}: study.reduce: {reduce!r} is unknown; allowed: {', '.join(REDUCTIONS)}"
        )
    if kind == "tuning_transfer" and not experiment.study.get("lrs"):
        raise UserError(
            f"{path}: study.lrs: a tuning_transfer study needs lrs: [the direction's learning "
            "rates to sweep]"
        )
