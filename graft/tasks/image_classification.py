"""Image classification: torchvision ResNets on ImageNet (ImageFolder) or on scikit-learn's digits.

`data.source: imagefolder` reads `data.root/train/<class>/<image>` and `data.root/val/...`
with `torchvision.datasets.ImageFolder` and the standard ImageNet transforms (random-resized
crop and flip for training; resize and center crop for evaluation). `data.source: digits` is
the CPU default: the 1,797 8x8 handwritten digits bundled with scikit-learn, no download.
`data.source: synthetic` draws `train_size` and `eval_size` random images of `image_size`
(graft/tasks/synthetic.py): ImageNet-shaped batches without ImageNet, for throughput checks.
Metrics: cross-entropy loss, top-1 and top-5 accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.transforms import v2

from graft.tasks.base import DataError, Task
from graft.tasks.synthetic import SyntheticSet, check_size

# ImageNet channel statistics, as torchvision's pretrained models are normalised.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCES = ("digits", "imagefolder", "synthetic")
RESNET_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
# Normalisation layers of `name: resnet`: BatchNorm as torchvision builds it, or GroupNorm with
# 32 groups (Wu & He 2018), which does not depend on the batch: a model whose gradient is the
# same however the batch is split over ranks or accumulation steps.
RESNET_NORMS = {
    "batch": nn.BatchNorm2d,
    "group": lambda channels: nn.GroupNorm(min(32, channels), channels),
    "none": lambda channels: nn.Identity(),
}


def build(cfg: Mapping[str, Any], *, seed: int, cache_dir: Path) -> Task:
    """The task of the `task` config: its model and its train and held-out splits."""
    data = cfg["data"]
    if data["source"] == "digits":
        train_set, eval_set = digits_splits(data["eval_fraction"])
        classes = int(train_set.tensors[1].max()) + 1
    elif data["source"] == "imagefolder":
        train_set, eval_set = image_folders(data)
        classes = len(train_set.classes)
    elif data["source"] == "synthetic":
        train_set, eval_set = synthetic_images(data, cfg["model"])
        classes = cfg["model"].get("num_classes", 1000)
    else:
        raise DataError(
            f"unknown task.data.source {data['source']!r}; allowed: {', '.join(SOURCES)}"
        )
    outputs = cfg["model"].get("num_classes", 1000)
    if not isinstance(outputs, int) or outputs < classes:
        raise DataError(
            f"task.model.num_classes={outputs!r} does not fit the data: task.data "
            f"({data['source']}) has {classes} classes; set task.model.num_classes={classes}"
        )
    return Task(
        name=cfg["name"],
        model=build_model(cfg["model"]),
        train_set=train_set,
        eval_set=eval_set,
        collate=None,
        loss=cross_entropy,
        eval_sums=topk_sums,
    )


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """`name: resnet` builds torchvision's ResNet class from `block` and `layers` (optionally
    with `norm` batch or group, `in_channels`, and a `small_input` stem: 3x3 stride 1, no
    max-pool); `name: cifar_resnet` the three-stage ResNet of He et al. 2016 for small images
    (`cifar_resnet`); any other name is a torchvision model (`resnet50`, ...) built untrained
    with the remaining keywords."""
    options = dict(cfg)
    name = options.pop("name")
    if name == "cifar_resnet":
        return cifar_resnet(options)
    if name != "resnet":
        try:
            return torchvision.models.get_model(name, weights=None, **options)
        except ValueError:
            raise DataError(
                f"unknown task.model.name {name!r}; allowed: resnet or a torchvision model "
                "such as resnet18, resnet50 (torchvision.models.list_models())"
            ) from None
    block = options.pop("block")
    if block not in RESNET_BLOCKS:
        raise DataError(f"unknown task.model.block {block!r}; allowed: {', '.join(RESNET_BLOCKS)}")
    norm = options.pop("norm", "batch")
    if norm not in RESNET_NORMS:
        raise DataError(f"unknown task.model.norm {norm!r}; allowed: {', '.join(RESNET_NORMS)}")
    in_channels = options.pop("in_channels", 3)
    small_input = options.pop("small_input", False)
    layers = list(options.pop("layers"))
    if len(layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in layers):
        raise DataError(
            f"task.model.layers={layers} is invalid; allowed: four block counts >= 1, "
            "e.g. [2, 2, 2, 2] (ResNet-18)"
        )
    model = ResNet(
        RESNET_BLOCKS[block],
        layers,
        norm_layer=RESNET_NORMS[norm],
        **options,
    )
    if small_input or in_channels != 3:
        kernel, stride = (3, 1) if small_input else (7, 2)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel, stride, kernel // 2, bias=False)
        # The initialisation torchvision gives every ResNet convolution.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if small_input:
        model.maxpool = nn.Identity()
    return model


def cifar_resnet(options: Mapping[str, Any]) -> nn.Module:
    """ResNet-(6n+2) of He et al. 2016, section 4.2: a 3x3 stem of `width` channels, three
    stages of n = (depth - 2) / 6 torchvision BasicBlocks with width, 2·width and 4·width
    channels (stride 2 and a 1x1 projection where a stage starts), global average pooling
    and a linear head. depth 8 with width 16: 78k parameters, about 20 ms per step of 64
    digits on one CPU thread, where the ImageNet-shaped `resnet` with four stages of
    64-512 channels has 4.9M and takes about 15 times longer."""
    allowed = {"depth", "width", "norm", "num_classes", "in_channels"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DataError(
            f"unknown task.model.{unknown[0]} for cifar_resnet; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    depth, width = options.get("depth", 20), options.get("width", 16)
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise DataError(
            f"task.model.depth={depth!r} is invalid for cifar_resnet; allowed: 6n+2 with n >= 1 "
            "(8, 14, 20, 32, 44, 56, 110)"
        )
    if not isinstance(width, int) or width < 1:
        raise DataError(f"task.model.width={width!r} is invalid; allowed: an integer >= 1")
    norm = options.get("norm", "batch")
    if norm not in RESNET_NORMS:
        raise DataError(f"unknown task.model.norm {norm!r}; allowed: {', '.join(RESNET_NORMS)}")
    return CifarResNet(
        (depth - 2) // 6,
        width,
        RESNET_NORMS[norm],
        options.get("in_channels", 3),
        options.get("num_classes", 10),
    )


class CifarResNet(nn.Module):
    """The three-stage ResNet of `cifar_resnet`, with torchvision ResNet's attribute names
    (conv1, bn1, layer1-3, fc), so its parameters read as a torchvision model's do."""

    def __init__(
        self, blocks: int, width: int, norm_layer: Any, in_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], width
        for stage in range(3):
            planes = width * 2**stage
            layer = []
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                projection = None
                if stride != 1 or channels != planes:
                    projection = nn.Sequential(
                        nn.Conv2d(channels, planes, 1, stride, bias=False), norm_layer(planes)
                    )
                layer.append(
                    BasicBlock(channels, planes, stride, projection, norm_layer=norm_layer)
                )
                channels = planes
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():  # torchvision ResNet's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        features = self.relu(self.bn1(self.conv1(images)))
        features = self.layer3(self.layer2(self.layer1(features)))
        return self.fc(torch.flatten(self.avgpool(features), 1))


def digits_splits(eval_fraction: float) -> tuple[Dataset, Dataset]:
    """scikit-learn's digits as 1x8x8 images, standardised by the train split's statistics.

    The held-out split is stratified and fixed (random_state 0): every seed and every cell
    is evaluated on the same images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < eval_fraction < 1:
        raise DataError(f"task.data.eval_fraction={eval_fraction!r} is invalid; allowed: (0, 1)")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    train_index, eval_index = train_test_split(
        range(len(labels)), test_size=eval_fraction, stratify=digits.target, random_state=0
    )
    train_images = images[train_index]
    mean, std = train_images.mean(), train_images.std()
    return (
        TensorDataset((train_images - mean) / std, labels[train_index]),
        TensorDataset((images[eval_index] - mean) / std, labels[eval_index]),
    )


def synthetic_images(data: Mapping[str, Any], model: Mapping[str, Any]) -> tuple[Dataset, Dataset]:
    """Random (image, label) items: images of `data.image_size` with the model's input
    channels, standard normal as normalised ImageNet images are near enough, and labels
    uniform over the model's classes."""
    size = data.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(
            f"task.data.image_size={size!r} is invalid for task.data.source=synthetic; "
            "allowed: an integer >= 1 (e.g. 224, ImageNet's; fix task.data.image_size)"
        )
    draw = partial(
        random_image,
        shape=(model.get("in_channels", 3), size, size),
        classes=model.get("num_classes", 1000),
    )
    return (
        SyntheticSet(check_size(data, "train_size"), "train", draw),
        SyntheticSet(check_size(data, "eval_size"), "eval", draw),
    )


def random_image(
    generator: torch.Generator, *, shape: tuple[int, int, int], classes: int
) -> tuple[Tensor, Tensor]:
    image = torch.randn(shape, generator=generator)
    return image, torch.randint(classes, (), generator=generator)


def image_folders(data: Mapping[str, Any]) -> tuple[Dataset, Dataset]:
    """ImageFolder train/ and val/ under data.root with the standard ImageNet transforms."""
    root = Path(data["root"]) if data.get("root") else None
    layout = "expected <root>/train/<class>/<image> and <root>/val/<class>/<image>"
    if root is None or not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DataError(
            f"task.data.root={str(root) if root else None!r} has no train/ and val/ folders; "
            f"{layout} (set task.data.root=...)"
        )
    size, resize = data["image_size"], data["resize_size"]
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_transform = v2.Compose(
        [v2.ToImage(), v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *normalize]
    )
    eval_transform = v2.Compose([v2.ToImage(), v2.Resize(resize), v2.CenterCrop(size), *normalize])
    try:
        train_set = torchvision.datasets.ImageFolder(
            root / "train", train_transform, loader=load_image
        )
        eval_set = torchvision.datasets.ImageFolder(root / "val", eval_transform, loader=load_image)
    except FileNotFoundError as error:
        raise DataError(f"task.data.root={str(root)!r}: {error}; {layout}") from None
    if train_set.classes != eval_set.classes:
        missing = sorted(set(train_set.classes) ^ set(eval_set.classes))[:3]
        raise DataError(
            f"task.data.root={str(root)!r}: train/ and val/ hold different classes "
            f"(e.g. {', '.join(missing)}); {layout}"
        )
    return train_set, eval_set


def load_image(path: str) -> Any:
    """ImageFolder's own loader; DataError naming the file when it cannot be read."""
    try:
        return torchvision.datasets.folder.default_loader(path)
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read the image {path} ({reason}); replace or remove it") from None


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def topk_sums(model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    images, labels = batch
    logits = model(images).float()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {
        "loss": F.cross_entropy(logits, labels, reduction="sum"),
        "top1": hits[:, 0].sum(),
        "top5": hits.any(dim=1).sum(),
        "count": torch.tensor(len(labels), device=labels.device),
    }
