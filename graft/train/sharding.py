"""`trainer.parallel=fsdp`: the model sharded with FSDP2, and its sharded checkpoints.

Each residual block (torchvision's BasicBlock and Bottleneck) or transformer layer
(transformers' BertLayer) is one `fully_shard` unit, and the root holds what is left (stem,
embeddings, heads): a unit's weights are gathered for its forward and backward only. Graft
steps the shards (graft/optim/sharded.py), so weights, gradients and both optimizers'
states are divided over the ranks.

A checkpoint of a sharded run is two parts: `step_N.dcp/`, the model's and the optimizer's
shards through `torch.distributed.checkpoint` (every rank writes its own), and `step_N.pt`,
everything else, as under DDP, written by rank 0 once the shards are on disk, so a
`step_N.pt` always has its shards.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from graft.optim import Graft

SHARDS = "shards"  # the checkpoint key naming its shards' folder


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """fully_shard each block, then the root, over all ranks (a 1-d mesh)."""
    mesh = init_device_mesh(device.type, (world_size,))
    units = sharded_units()
    for module in model.modules():
        if isinstance(module, units):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sharded_units() -> tuple[type, ...]:
    """The blocks each sharded on their own (imported here: an image run needs no
    transformers, nor a text run torchvision, until it shards)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from transformers.models.bert.modeling_bert import BertLayer

    return (BasicBlock, Bottleneck, BertLayer)


def shards_path(checkpoint_file: Path) -> Path:
    return checkpoint_file.with_suffix(".dcp")


def save_shards(model: nn.Module, optimizer: Graft, checkpoint_file: Path) -> str:
    """Every rank writes its shards beside the checkpoint file to come; their folder's name."""
    folder = shards_path(checkpoint_file)
    if dist.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)  # a killed save's half-written folder
        folder.parent.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    dist.barrier()  # all shards on disk before rank 0 writes the file that points at them
    return folder.name


def load_shards(
    model: nn.Module, optimizer: Graft, checkpoint: Mapping[str, Any], directory: Path
) -> None:
    """The model's and the optimizer's shards of `checkpoint` into them (any world size)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory / checkpoint[SHARDS])
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights on the CPU, under the names `safetensors.torch.save_model` gives
    an unsharded model (a collective: every rank calls it; rank 0 gets them)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    # Tied weights (BERT's decoder and word embeddings) are one parameter under two names:
    # save_model keeps one of the names, chosen by safetensors' own rule, applied here to
    # stand-ins that share a tensor where the model's parameters do.
    stand_ins: dict[int, torch.Tensor] = {}
    shared = {
        name: stand_ins.setdefault(id(tensor), torch.empty(1))
        for name, tensor in model.state_dict(keep_vars=True).items()
    }
    removed = safetensors.torch._remove_duplicate_names(shared)  # {kept: [dropped, ...]}
    dropped = {name for names in removed.values() for name in names}
    return {name: tensor for name, tensor in weights.items() if name not in dropped}
