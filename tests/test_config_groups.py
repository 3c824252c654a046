"""Every file of the optim, graft and schedule config groups composes and builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from graft import Graft
from graft.train.schedules import build_schedule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def names(group):
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose(overrides=list(overrides)), resolve=True)


def test_groups_hold_every_builtin_rule_and_schedule():
    assert names("optim") == ["adagrad", "adam", "adamw", "lamb", "lars", "rmsprop", "sgd"]
    assert names("graft") == ["global", "off", "tensor"]
    assert names("schedule") == ["constant", "cosine", "linear", "polynomial", "step_decay"]


@pytest.mark.parametrize("magnitude", names("optim"))
@pytest.mark.parametrize("granularity", names("graft"))
def test_optim_and_graft_files_build_a_graft(magnitude, granularity):
    direction = "adam" if magnitude != "adam" else "sgd"
    cfg = composed(
        f"+optim@magnitude={magnitude}", f"+optim@direction={direction}", f"+graft={granularity}"
    )
    graft = cfg["graft"]
    model = torch.nn.Linear(3, 2)
    optimizer = Graft(
        model.parameters(),
        cfg["magnitude"],
        cfg["direction"] if graft["enabled"] else None,
        granularity=graft["granularity"],
        eps=graft["eps"],
    )
    assert optimizer.grafting() == graft["enabled"]
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("schedule", names("schedule"))
def test_schedule_files_build_a_scheduler(schedule):
    options = composed(f"+schedule={schedule}")["schedule"]
    optimizer = Graft(torch.nn.Linear(3, 2).parameters(), {"name": "sgd", "lr": 0.1})
    build_schedule(optimizer, max_steps=100, **options)
