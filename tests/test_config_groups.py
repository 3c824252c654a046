"""Every config file composes (alone and through train.yaml) and builds what it describes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from transformers import BertConfig

from graft import Graft
from graft.optim import RULES
from graft.tasks import build_task
from graft.train.checks import check_trainer
from graft.train.config import register_resolvers
from graft.train.metrics import wandb_mode
from graft.train.optimizer import build_optimizer
from graft.train.schedules import build_schedule
from graft.train.setup import make_scheduler

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def names(group):
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose(overrides=list(overrides)), resolve=True)


def test_groups_hold_every_builtin_rule_and_schedule():
    assert names("optim") == sorted(RULES)
    assert names("graft") == ["global", "off", "tensor"]
    assert names("schedule") == [
        "constant",
        "cosine",
        "linear",
        "polynomial",
        "replay",  # a recorded run's per-tensor schedule: tests/test_transfer.py
        "step_decay",
    ]


@pytest.mark.parametrize("name", names("optim"))
def test_optim_files_name_their_rule_and_only_its_keywords(name):
    """configs/optim/X.yaml is rule X: its file name is its name, its keys the rule's."""
    spec = composed(f"+optim@magnitude={name}")["magnitude"]
    assert spec["name"] == name
    assert set(spec) - {"name"} <= set(RULES[name].defaults)


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


@pytest.mark.parametrize("schedule", [name for name in names("schedule") if name != "replay"])
def test_schedule_files_build_a_scheduler(schedule):
    options = composed(f"+schedule={schedule}")["schedule"]
    optimizer = Graft(torch.nn.Linear(3, 2).parameters(), {"name": "sgd", "lr": 0.1})
    build_schedule(optimizer, max_steps=100, **options)


def train_config(*overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)


def test_train_yaml_composes_every_group():
    assert names("task") == [
        "bert_base",
        "digits_resnet",
        "digits_resnet8",
        "imagenet_resnet50",
        "pydoc_lm",
        "tiny_bert",
    ]
    assert names("trainer") == ["default"] and names("logger") == ["none", "wandb"]
    cfg = train_config()
    assert cfg["task"]["name"] == "digits_resnet"
    assert (cfg["magnitude"]["name"], cfg["direction"]["name"]) == ("adam", "sgd")
    assert cfg["schedule"]["name"] == "cosine"  # the task's choice
    assert train_config("schedule=linear")["schedule"]["name"] == "linear"  # the user's wins


@pytest.mark.parametrize("logger", names("logger"))
def test_logger_files_build_a_mode(logger, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    mode = wandb_mode(train_config(f"logger={logger}")["logger"])
    assert mode == (None if logger == "none" else ("offline", "WANDB_MODE=offline"))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["digits_resnet", "tiny_bert", "imagenet_resnet50"])
def test_task_files_build_their_task_optimizer_and_schedule(task, tmp_path):
    overrides = [f"task={task}", f"cache_dir={tmp_path / 'cache'}"]
    if task == "imagenet_resnet50":
        for split in ("train", "val"):
            (tmp_path / "imagenet" / split / "n0").mkdir(parents=True)
            Image.new("RGB", (40, 40)).save(tmp_path / "imagenet" / split / "n0" / "a.JPEG")
        overrides.append(f"task.data.root={tmp_path / 'imagenet'}")
    cfg = train_config(*overrides)
    check_trainer(cfg["trainer"])
    built = build_task(cfg["task"], seed=0, cache_dir=Path(cfg["cache_dir"]))
    optimizer = build_optimizer(built.model, cfg)
    make_scheduler(optimizer, cfg["schedule"], cfg["trainer"]["max_steps"])
    assert len(built.train_set) > 0 and len(built.eval_set) > 0


def test_full_scale_task_files_hold_the_paper_settings():
    """bert_base needs the hub for its tokenizer and data: its values are checked, and its
    model is built from them."""
    imagenet = train_config("task=imagenet_resnet50", "optim@magnitude=sgd")
    assert imagenet["trainer"]["batch_size"] == 4096
    assert imagenet["schedule"]["name"] == "step_decay" and imagenet["magnitude"]["momentum"] == 0.9
    bert = train_config("task=bert_base")
    model = bert["task"]["model"]
    assert (model["num_hidden_layers"], model["hidden_size"], model["num_attention_heads"]) == (
        12,
        768,
        12,
    )
    assert bert["task"]["data"]["seq_len"] == 128 and bert["trainer"]["batch_size"] == 256
    assert bert["schedule"]["name"] == "linear"
    config = BertConfig(vocab_size=30522, **model)
    assert config.num_hidden_layers == 12 and config.intermediate_size == 3072
