"""The image-classification task: the ImageFolder path ImageNet runs through, and digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from graft.tasks import DataError, build_task
from graft.tasks.image_classification import IMAGENET_MEAN, IMAGENET_STD, build_model

CLASSES = ("n01440764", "n01443537", "n01484850")  # ImageNet-style synset folder names


def write_image_folder(root: Path, per_class: int = 4) -> Path:
    """A tiny ImageNet layout: train/<class>/*.JPEG and val/<class>/*.JPEG, random pixels."""
    generator = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for index in range(per_class):
                size = (40 + 8 * index, 48)  # uneven sizes, as real photos
                pixels = generator.integers(0, 256, (*size, 3), dtype=np.uint8)
                pixels[..., label] = 255  # a class signal in one channel
                Image.fromarray(pixels).save(root / split / name / f"{name}_{index}.JPEG")
    return root


def imagefolder_task(root: Path, **data):
    cfg = {
        "name": "imagenet_resnet50",
        "kind": "image_classification",
        "model": {"name": "resnet18", "num_classes": len(CLASSES)},
        "data": {"source": "imagefolder", "root": str(root), "image_size": 32, "resize_size": 36}
        | data,
    }
    return build_task(cfg, seed=0, cache_dir=root / "cache")


def test_image_folder_reads_train_and_val_with_the_imagenet_transforms(tmp_path):
    task = imagefolder_task(write_image_folder(tmp_path / "imagenet"))
    assert task.train_set.classes == list(CLASSES) and len(task.train_set) == 12
    image, label = task.eval_set[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    # Evaluation is deterministic (resize + center crop); training is randomly cropped.
    assert torch.equal(task.eval_set[5][0], image)
    assert task.train_set[0][0].shape == (3, 32, 32)
    # Normalised with ImageNet statistics: a white pixel maps to (1 - mean) / std.
    white = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(image[1].max(), white[1], atol=1e-5)


def test_image_folder_metrics_are_top1_top5_and_loss(tmp_path):
    task = imagefolder_task(write_image_folder(tmp_path / "imagenet"))
    images, labels = torch.utils.data.default_collate([task.eval_set[i] for i in range(6)])
    task.model.eval()
    sums = task.eval_sums(task.model, (images, labels))
    assert set(sums) == {"loss", "top1", "top5", "count"} and int(sums["count"]) == 6
    assert int(sums["top5"]) == 6  # three classes: always in the top five
    assert 0 <= int(sums["top1"]) <= 6 and sums["loss"] > 0


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "has no train/ and val/ folders; expected <root>/train/<class>/<image>"),
        ("no_val", "has no train/ and val/ folders"),
        ("empty", "Couldn't find any class folder"),
    ],
)
def test_a_bad_image_folder_names_the_path_and_the_layout(tmp_path, layout, message):
    root = tmp_path / "imagenet"
    if layout == "no_val":
        (root / "train" / "a").mkdir(parents=True)
    if layout == "empty":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    with pytest.raises(DataError, match="task.data.root") as error:
        imagefolder_task(root)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_more_classes_than_model_outputs_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "imagenet", per_class=1)
    cfg_model = {"name": "resnet18", "num_classes": 2}
    with pytest.raises(DataError, match="set task.model.num_classes=3"):
        build_task(
            {
                "name": "x",
                "kind": "image_classification",
                "model": cfg_model,
                "data": {
                    "source": "imagefolder",
                    "root": str(root),
                    "image_size": 32,
                    "resize_size": 36,
                },
            },
            seed=0,
            cache_dir=tmp_path,
        )


def test_digits_default_splits_and_small_resnet():
    task = build_task(
        {
            "name": "digits_resnet",
            "kind": "image_classification",
            "model": {
                "name": "resnet",
                "block": "basic",
                "layers": [1, 1, 1, 1],
                "num_classes": 10,
                "in_channels": 1,
                "small_input": True,
            },
            "data": {"source": "digits", "eval_fraction": 0.2},
        },
        seed=0,
        cache_dir=Path("unused"),
    )
    assert len(task.train_set) + len(task.eval_set) == 1797 and len(task.eval_set) == 360
    train_images = task.train_set.tensors[0]
    assert train_images.shape[1:] == (1, 8, 8)
    assert abs(float(train_images.mean())) < 1e-5 and abs(float(train_images.std()) - 1) < 1e-4
    # Stratified: every digit is held out in proportion.
    assert torch.bincount(task.eval_set.tensors[1]).tolist() == pytest.approx([36] * 10, abs=1)
    logits = task.model(train_images[:4])
    assert logits.shape == (4, 10)


def train_on_image_folder(root: Path, run_dir: Path, *overrides: str):
    """graft-train task=imagenet_resnet50 in a fresh process, with only its sizes scaled to
    the tiny ImageFolder at root (3 classes, 32-pixel crops, batch 6, fp32)."""
    scaled = [
        "task=imagenet_resnet50",
        f"task.data.root={root}",
        "task.model.num_classes=3",
        "task.data.image_size=32",
        "task.data.resize_size=36",
        "trainer.batch_size=6",
        "trainer.bf16=false",
        "logger=none",
        "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.run(
        [sys.executable, "-m", "graft.train", *scaled, *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_imagenet_config_trains_through_the_cli_on_a_tiny_image_folder(tmp_path):
    """task=imagenet_resnet50 (ResNet-50, step decay, ImageFolder) with only sizes scaled down."""
    root = write_image_folder(tmp_path / "imagenet", per_class=2)
    run_dir = tmp_path / "run"
    result = train_on_image_folder(
        root,
        run_dir,
        "trainer.micro_batch_size=3",  # two accumulation steps
        "trainer.max_steps=2",
        "trainer.eval_every=1",
        "trainer.log_every=1",
        "trainer.num_workers=0",
        "schedule.warmup_steps=1",
        "schedule.milestones=[1]",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["eval/top1"] <= 1 and summary["eval/top5"] == 1
    assert summary["parameters"] > 23_000_000  # ResNet-50
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # One warmup step at the base lr, then x0.1 from the milestone on.
    assert [line["train/lr"] for line in lines] == pytest.approx([1e-3, 1e-4])


def test_an_unreadable_image_is_named(tmp_path):
    root = write_image_folder(tmp_path / "imagenet", per_class=2)
    broken = root / "train" / CLASSES[1] / f"{CLASSES[1]}_0.JPEG"
    broken.write_bytes(b"not a jpeg")
    task = imagefolder_task(root)
    index = task.train_set.samples.index((str(broken), 1))
    with pytest.raises(DataError, match=f"cannot read the image {broken} "):
        task.train_set[index]


@pytest.mark.slow
def test_an_unreadable_image_met_in_training_ends_the_run_in_one_line(tmp_path):
    """Met in a DataLoader worker: the worker's traceback is not the message."""
    root = write_image_folder(tmp_path / "imagenet", per_class=2)
    for name in CLASSES:  # every training image broken: the first batch meets one
        for path in (root / "train" / name).iterdir():
            path.write_bytes(b"\x00" * 16)
    result = train_on_image_folder(
        root,
        tmp_path / "run",
        "task.model.name=resnet18",
        "trainer.max_steps=1",
        "trainer.num_workers=1",
        "schedule.warmup_steps=0",
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graft-train: error: cannot read the image ")
    assert str(root / "train") in lines[0] and "replace or remove it" in lines[0]


def cifar_resnet(**options):
    return build_model({"name": "cifar_resnet", "in_channels": 1, "num_classes": 10, **options})


@pytest.mark.parametrize(("depth", "blocks"), [(8, 1), (14, 2), (20, 3)])
def test_cifar_resnet_has_three_stages_of_n_blocks_and_torchvision_names(depth, blocks):
    model = cifar_resnet(depth=depth, width=16)
    names = [name for name, _ in model.named_parameters()]
    assert names[0] == "conv1.weight" and names[-2:] == ["fc.weight", "fc.bias"]
    for stage, channels in ((1, 16), (2, 32), (3, 64)):
        layer = getattr(model, f"layer{stage}")
        assert len(layer) == blocks
        assert layer[0].conv1.out_channels == channels
    # A projection where a stage starts (stride 2, more channels); identity shortcuts elsewhere.
    assert model.layer1[0].downsample is None
    assert model.layer2[0].downsample is not None and model.layer2[0].conv1.stride == (2, 2)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_cifar_resnet_depth_8_width_16_is_the_digits_proxy_size():
    # 3x3 convolutions of 16-32-64 channels, two per block, 1x1 projections, BN scale/shift.
    assert sum(p.numel() for p in cifar_resnet(depth=8, width=16).parameters()) == 77_754


def test_cifar_resnet_without_normalisation_has_no_norm_parameters():
    model = cifar_resnet(depth=8, width=16, norm="none")
    assert not [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert all(".bn" not in name for name, _ in model.named_parameters())
    assert torch.isfinite(model(torch.randn(4, 1, 8, 8))).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"depth": 10}, "task.model.depth=10 is invalid for cifar_resnet; allowed: 6n+2"),
        ({"width": 0}, "task.model.width=0 is invalid"),
        ({"norm": "layer"}, "unknown task.model.norm 'layer'; allowed: batch, group, none"),
        ({"layers": [1, 1, 1, 1]}, "unknown task.model.layers for cifar_resnet; allowed:"),
    ],
)
def test_a_bad_cifar_resnet_option_is_one_line_naming_it(options, message):
    with pytest.raises(DataError) as error:
        cifar_resnet(**options)
    assert message in str(error.value) and "\n" not in str(error.value)
