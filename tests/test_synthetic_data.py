"""task.data.source=synthetic: ImageNet- and BERT-shaped items drawn on demand, the same item
every time it is read, and the full-scale configs training on them through the CLI."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from graft.tasks import DataError, build_task
from graft.tasks.masked_lm import IGNORE_INDEX, placeholder_tokenizer
from tests.runs import config


def synthetic_task(task: str, *overrides: str, cache_dir):
    cfg = config(f"task={task}", "task.data.source=synthetic", *overrides)
    return build_task(cfg["task"], seed=0, cache_dir=cache_dir)


def test_synthetic_imagenet_has_imagenet_sizes_and_draws_each_image_the_same_every_time(tmp_path):
    task = synthetic_task("imagenet_resnet50", cache_dir=tmp_path)
    assert (len(task.train_set), len(task.eval_set)) == (1_281_167, 50_000)  # ImageNet's
    image, label = task.train_set[1_281_166]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and 0 <= int(label) < 1000
    again, label_again = task.train_set[1_281_166]
    assert torch.equal(image, again) and int(label) == int(label_again)
    assert not torch.equal(task.train_set[0][0], task.train_set[1][0])
    assert not torch.equal(task.train_set[7][0], task.eval_set[7][0])  # splits differ
    assert abs(float(image.mean())) < 0.01 and abs(float(image.std()) - 1) < 0.01
    with pytest.raises(IndexError):
        task.train_set[1_281_167]


def test_synthetic_items_are_the_same_in_loader_workers(tmp_path):
    """Item i comes from its own seed, not from a worker's RNG: workers, ranks and resumed
    runs read the same data."""
    task = synthetic_task(
        "imagenet_resnet50", "task.data.image_size=8", "task.data.train_size=12", cache_dir=tmp_path
    )
    here = torch.stack([task.train_set[index][0] for index in range(12)])
    loader = DataLoader(task.train_set, batch_size=4, num_workers=2)
    there = torch.cat([images for images, _ in loader])
    assert torch.equal(here, there)
    assert torch.equal(pickle.loads(pickle.dumps(task.train_set))[3][0], here[3])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("task.data.train_size=0", "task.data.train_size=0 is invalid"),
        ("task.data.eval_size=-3", "task.data.eval_size=-3 is invalid"),
        ("task.data.image_size=0", "task.data.image_size=0 is invalid"),
    ],
)
def test_a_bad_synthetic_size_is_named(tmp_path, override, named):
    with pytest.raises(DataError, match=named) as caught:
        synthetic_task("imagenet_resnet50", override, cache_dir=tmp_path)
    assert "allowed: an integer >= 1" in str(caught.value)


def test_synthetic_bert_blocks_are_bert_shaped_and_the_eval_split_is_masked_once(tmp_path):
    task = synthetic_task(
        "bert_base",
        "task.tokenizer.name=null",
        "task.model.num_hidden_layers=1",
        "task.data.eval_size=16",
        cache_dir=tmp_path,
    )
    assert (len(task.train_set), len(task.eval_set)) == (2**20, 16)
    vocab = task.model.config.vocab_size
    assert vocab == 30522  # BERT's, from task.tokenizer.vocab_size
    block = task.train_set[2**20 - 1]["input_ids"]
    assert block.shape == (128,) and torch.equal(block, task.train_set[2**20 - 1]["input_ids"])
    tokenizer = placeholder_tokenizer(vocab)
    assert (int(block[0]), int(block[-1])) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    body = block[1:-1]
    assert not set(body.tolist()) & set(tokenizer.all_special_ids)
    assert int(body.min()) >= 5 and int(body.max()) < vocab
    # The collator masks training blocks per batch; the eval blocks carry their masks.
    batch = task.collate([task.train_set[index] for index in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 128)
    masked = task.eval_set["labels"][0] != IGNORE_INDEX
    assert 0 < int(masked.sum()) < 128
    assert task.loss(task.model, batch).item() == pytest.approx(math.log(vocab), rel=0.1)


def test_synthetic_blocks_use_a_given_tokenizer_and_avoid_its_special_tokens(tmp_path):
    saved = tmp_path / "tokenizer"
    given = placeholder_tokenizer(64)
    given.add_special_tokens({"additional_special_tokens": ["[EXTRA]"]})
    given.save_pretrained(saved)
    task = synthetic_task(
        "bert_base",
        f"task.tokenizer.name={saved}",
        "task.model.num_hidden_layers=1",
        "task.data.eval_size=8",
        "task.data.seq_len=16",
        cache_dir=tmp_path,
    )
    assert task.model.config.vocab_size == 65
    seen = set(torch.cat([task.train_set[i]["input_ids"][1:-1] for i in range(200)]).tolist())
    assert seen <= set(range(5, 64))  # [EXTRA] (id 64) is special: never drawn


@pytest.mark.slow
@pytest.mark.parametrize(
    "task",
    [
        [
            "task=imagenet_resnet50",
            "task.data.image_size=32",
            "task.data.eval_size=8",
            "trainer.bf16=false",
            "schedule.milestones=[1]",
        ],
        [
            "task=bert_base",
            "task.tokenizer.name=null",
            "task.model.num_hidden_layers=1",
            "task.data.seq_len=16",
            "task.data.eval_size=8",
        ],
    ],
    ids=["imagenet_resnet50", "bert_base"],
)
def test_the_full_scale_configs_train_on_synthetic_data_through_the_cli(tmp_path, task):
    """No ImageNet, no hub: the paper's two workloads at full width run end to end."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "graft.train",
            *task,
            "task.data.source=synthetic",
            "trainer.batch_size=4",
            "trainer.max_steps=2",
            "trainer.eval_every=0",
            "trainer.num_workers=0",
            "schedule.warmup_steps=1",
            "logger=none",
            "trainer.progress=false",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert summary["parameters"] > 23_000_000  # ResNet-50, or BERT-base's width and vocabulary
